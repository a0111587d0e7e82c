"""The one place where kvsparse adapts to the installed transformers.

Supported: transformers 4.57 (the last 4.x) through the newest 5.x (see the
``hf`` extra in ``pyproject.toml``). Differences are keyed on features found
at run time (signatures, attributes), not on version strings:

* **the cache keyword of the forwards**: ``past_key_values`` up to 5.23,
  ``cache`` from 5.24 (attention and decoder-layer forwards, ``generate``'s
  ``model_kwargs``). :func:`cache_kwarg` reads it from a forward's signature.
* **cache-layer API**: up to 5.12 a layer's maximum length is the abstract
  ``get_max_cache_shape``; later ones use ``get_max_length``.
  ``lazy_initialization`` takes ``key_states`` alone on 4.57 and
  ``(key_states, value_states)`` later; ``get_mask_sizes`` receives
  ``cache_position`` (a tensor) on 4.57 and ``query_length`` (an int) later.
  The kvsparse layers accept both forms (see :func:`query_length`).
* **generation config**: ``max_cache_len`` exists only on recent versions
  (:func:`generation_max_cache_len`).
* **model families**: which of the supported families this transformers
  ships (:func:`find_classes`; every one of Llama, Mistral, Qwen2, Qwen3 and
  Gemma 3 exists from 4.57 on, but a family missing from an install is
  reported as unsupported, never half-patched).
* **GGUF loading**: ``load_gguf_checkpoint`` takes ``torch_dtype`` from 5.0
  on, not on 4.57 (:func:`gguf_checkpoint_kwargs`; the tensors are then cast
  when loaded into the model).
* **transformers' own cache layers** for the layers kvsparse leaves to the
  model (Gemma 3's sliding-window layers): taken from the ``DynamicCache`` /
  ``StaticCache`` that transformers builds from the model config
  (:func:`transformers_cache_layers`), so that they are exactly what the
  unpatched model would use, whatever the layer classes are called.

Anything that cannot be found raises :class:`IntegrationError` naming the
transformers version and what is missing: a patched model never runs dense
silently.
"""
import inspect

import torch

__all__ = [
    "IntegrationError", "transformers_version", "cache_kwarg", "query_length",
    "generation_max_cache_len", "MIN_TRANSFORMERS", "find_classes", "transformers_cache_layers",
    "gguf_checkpoint_kwargs",
]

#: the oldest transformers release kvsparse supports (also in pyproject's ``hf`` extra)
MIN_TRANSFORMERS = "4.57"

#: names a forward may give its cache argument, newest first
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


class IntegrationError(RuntimeError):
    """The patched model's decode step would not go through kvsparse (a
    transformers change, a cache of the wrong kind, an uncommitted prefill)."""


def transformers_version():
    try:
        import transformers
    except ImportError:  # pragma: no cover - the hf extra is missing
        return "not installed"
    return transformers.__version__


def cache_kwarg(fn, what):
    """The name of ``fn``'s cache parameter (one of :data:`CACHE_KWARGS`) and
    its positional index (``None`` when keyword-only).

    Raises :class:`IntegrationError` when ``fn`` takes none of them."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:  # pragma: no cover - builtins
        raise IntegrationError(f"kvsparse: cannot read the signature of {what}: {e}") from e
    names = [p.name for p in params]
    for name in CACHE_KWARGS:
        if name in names:
            p = params[names.index(name)]
            positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            # the index among the arguments after ``self`` (hooks see args without self)
            idx = [q.name for q in params if q.name != "self"].index(name) if positional else None
            return name, idx
    raise IntegrationError(
        f"kvsparse: {what} takes no cache argument (looked for {', '.join(CACHE_KWARGS)}; "
        f"transformers {transformers_version()}); this version's attention is not supported"
    )


def model_cache_kwargs(model, cache):
    """``{name: cache}`` for calling ``model(...)`` directly with a cache,
    under the name its forward takes (``cache`` from 5.24, ``past_key_values``
    before)."""
    name, _ = cache_kwarg(type(model).forward, f"{type(model).__name__}.forward")
    return {name: cache}


def output_cache(out):
    """The cache a model output carries (``past_key_values`` or ``cache``)."""
    for name in ("past_key_values", "cache"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


def query_length(arg):
    """``get_mask_sizes``'s argument as the number of new tokens: an int
    (transformers >= 5) or ``cache_position`` (a 1-D tensor, 4.57)."""
    if torch.is_tensor(arg):
        return int(arg.shape[0]) if arg.dim() > 0 else 1
    return int(arg)


def generation_max_cache_len(generation_config):
    """``generation_config.max_cache_len``, or ``None`` on versions without it."""
    return getattr(generation_config, "max_cache_len", None)


def find_classes(module, *names):
    """The classes ``names`` of the transformers module ``module`` (e.g.
    ``"transformers.models.qwen3.modeling_qwen3"``), or ``None`` when this
    transformers lacks the module or any of them."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    found = tuple(getattr(mod, n, None) for n in names)
    return None if any(c is None for c in found) else found


def transformers_cache_layers(model_config, max_cache_len=None):
    """The cache layers transformers would give ``model_config``'s model: those
    of ``DynamicCache(config=...)`` (``max_cache_len=None``) or of
    ``StaticCache(config=..., max_cache_len=...)``."""
    from transformers.cache_utils import DynamicCache, StaticCache

    if max_cache_len is None:
        cache = DynamicCache(config=model_config)
    else:
        cache = StaticCache(config=model_config, max_cache_len=int(max_cache_len))
    layers = list(getattr(cache, "layers", ()))
    if not layers:
        raise IntegrationError(
            f"kvsparse: transformers {transformers_version()} built no cache layers from the model config; "
            "its sliding-window layers cannot be kept on transformers' own cache")
    return layers


def gguf_checkpoint_kwargs(fn, dtype):
    """``{"torch_dtype": dtype}`` when ``fn`` (transformers'
    ``load_gguf_checkpoint``) takes it, else ``{}``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return {}
    return {"torch_dtype": dtype} if "torch_dtype" in params else {}


def lazy_initialization(layer, key_states, value_states):
    """``layer.lazy_initialization`` with the arguments its version takes
    (transformers' own layers take ``key_states`` alone on 4.57)."""
    params = inspect.signature(layer.lazy_initialization).parameters
    if len(params) >= 2:
        layer.lazy_initialization(key_states, value_states)
    else:
        layer.lazy_initialization(key_states)


def static_cache_names():
    """``generation_config.cache_implementation`` values that ask for a static
    cache kvsparse can provide: ``"static"`` and the deprecated aliases some
    checkpoints still carry (Gemma 3's ``"hybrid"``, ``"sliding_window"``,
    ...); not the offloaded ones."""
    try:
        from transformers.generation import configuration_utils as cu
    except ImportError:  # pragma: no cover
        return ("static",)
    names = getattr(cu, "ALL_STATIC_CACHE_IMPLEMENTATIONS", ("static",))
    return tuple(n for n in names if "offload" not in n) or ("static",)
