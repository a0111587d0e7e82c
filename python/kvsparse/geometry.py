"""What kvsparse reads of a model, read in one place: :class:`ModelGeometry`.

:func:`read_model` looks at a (supported) model once: its attention modules,
the shapes of its KV cache (layers, heads, head dim), which layers are
sliding-window layers of a hybrid model, the device each attention runs on
and the dtype of its weights. :func:`kvsparse.patch` and
:func:`kvsparse.make_cache` read the model with it and hand the result on
(the patch's pre-hooks, the native-layer choice of :mod:`kvsparse.hf`, the
layers of :class:`~kvsparse.cache.KVSparseCache`); nothing else asks the
model for these facts.

A cache built from a transformers config alone
(``KVSparseCache(model_config=...)``) reads it with
:meth:`ModelGeometry.from_config`: the same facts, without the modules and
devices.

Supported families (:func:`supported_models`): Llama, Mistral, Qwen2, Qwen3
and Gemma 3 (text), their base models and subclasses.

Nothing here imports transformers at import time.
"""
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch

from . import _compat

__all__ = [
    "ModelGeometry", "read_model", "supported_models", "cache_geometry", "sliding_layers",
    "WINDOWED_LAYER_TYPES",
]


# --------------------------------------------------------------------- models
#: (transformers module, causal LM, base model, attention) of each supported family
FAMILIES = (
    ("transformers.models.llama.modeling_llama", "LlamaForCausalLM", "LlamaModel", "LlamaAttention"),
    ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM", "MistralModel", "MistralAttention"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2Model", "Qwen2Attention"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM", "Qwen3Model", "Qwen3Attention"),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3Attention"),
)


def supported_classes():
    """``(model classes, attention classes)`` of the families this
    transformers ships (causal LMs first, then the base models)."""
    found = [c for c in (_compat.find_classes(mod, *names) for mod, *names in FAMILIES) if c is not None]
    models = tuple(c[0] for c in found) + tuple(c[1] for c in found)
    attentions = tuple(c[2] for c in found)
    return models, attentions


def supported_models():
    """Names of the model classes :func:`kvsparse.patch` accepts (and their subclasses)."""
    return tuple(c.__name__ for c in supported_classes()[0])


# ------------------------------------------------------------------- configs
#: ``layer_types`` entries of a windowed layer (transformers' names)
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def _text_config(model_config):
    return model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config


def _sliding_layers(cfg):
    types = getattr(cfg, "layer_types", None)
    if not types:
        return ()
    types = list(types)[: cfg.num_hidden_layers]
    windowed = tuple(i for i, t in enumerate(types) if t in WINDOWED_LAYER_TYPES)
    return () if len(windowed) == len(types) else windowed


# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class ModelGeometry:
    """The facts of a decoder model that its kvsparse cache and patch need.

    Attributes:
        model_config: the model's transformers config (the whole one:
            transformers' own cache layers are built from it).
        num_layers: number of decoder layers.
        num_heads: query heads per layer.
        num_kv_heads: key / value heads per layer.
        head_dim: dim of a head.
        sliding_layers: indices of the sliding-window layers of a *hybrid*
            decoder (some layers windowed, some full, from
            ``config.layer_types``: Gemma 3, Qwen2/3 with
            ``use_sliding_window`` and ``max_window_layers``). A kvsparse
            cache leaves them to transformers' own cache layer and the
            model's own (windowed) attention. ``()`` when every layer is
            windowed or there are no ``layer_types`` (Mistral with
            ``sliding_window``): every layer runs the method, the window
            applied at prefill only (see :mod:`kvsparse.hf`).
        attention_modules: the model's attention modules (``()`` when read
            from a config).
        layer_devices: per layer, the device its attention runs on: its
            weights' device, or accelerate's execution device for weights
            offloaded to ``meta``; ``None`` where it cannot be told (and for
            every layer when read from a config).
        device: the device of the model's first parameter (``meta`` when
            offloaded), ``None`` when read from a config.
        dtype: the dtype of the model's first parameter, ``None`` when read
            from a config.
    """

    model_config: object = field(repr=False)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_layers: Tuple[int, ...] = ()
    attention_modules: tuple = field(default=(), repr=False)
    layer_devices: Tuple[Optional[torch.device], ...] = ()
    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None

    @classmethod
    def from_config(cls, model_config):
        """The geometry of a transformers decoder config (no modules, devices nor dtype)."""
        cfg = _text_config(model_config)
        heads = cfg.num_attention_heads
        num_layers = cfg.num_hidden_layers
        return cls(
            model_config=model_config,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            sliding_layers=_sliding_layers(cfg),
            layer_devices=(None,) * num_layers,
        )

    def layer_device(self, i):
        """Where layer ``i`` runs: its own device, else the model's first
        parameter's (possibly ``meta``), else ``None``."""
        dev = self.layer_devices[i] if i < len(self.layer_devices) else None
        return dev if dev is not None else self.device

    def on_device(self, device):
        """A copy with every layer on ``device``."""
        return replace(self, layer_devices=(torch.device(device),) * self.num_layers)


def _attention_device(module):
    """Where ``module`` runs, or ``None`` (no parameters, no layer index, or
    offloaded without an execution device)."""
    p = next(module.parameters(), None)
    if p is None or getattr(module, "layer_idx", None) is None:
        return None
    dev = p.device
    if dev.type == "meta":
        dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if dev is None:
            return None
        dev = torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return dev


def read_model(model):
    """The :class:`ModelGeometry` of ``model``, a supported model (see
    :func:`supported_models`).

    Raises:
        TypeError: ``model`` is not of a supported family, or has no
            supported attention module.
    """
    models, attentions = supported_classes()
    if not isinstance(model, models):
        raise TypeError(
            f"kvsparse: {type(model).__name__} is not supported; supported models: "
            f"{', '.join(supported_models())}"
        )
    modules = tuple(m for m in model.modules() if isinstance(m, attentions))
    if not modules:
        raise TypeError(f"kvsparse: no supported attention module found in {type(model).__name__}")
    geometry = ModelGeometry.from_config(model.config)
    devices = [None] * geometry.num_layers
    for m in modules:
        dev = _attention_device(m)
        if dev is not None and 0 <= int(m.layer_idx) < geometry.num_layers:
            devices[int(m.layer_idx)] = dev
    param = next(model.parameters())
    return replace(geometry, attention_modules=modules, layer_devices=tuple(devices),
                   device=param.device, dtype=param.dtype)


# ------------------------------------------------- the functions of old names
def sliding_layers(model_config):
    """:attr:`ModelGeometry.sliding_layers` of a transformers config."""
    return _sliding_layers(_text_config(model_config))


def cache_geometry(model_config):
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder config."""
    g = ModelGeometry.from_config(model_config)
    return g.num_layers, g.num_kv_heads, g.head_dim
