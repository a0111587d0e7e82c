"""Drop-in sparse / quantized decode attention (Quest, SparQ, QAQ) for Hugging Face LLaMA-family models.

Supported families (:func:`supported_models`): Llama (Llama-3.x ``rope_scaling``
included), Mistral, Qwen2, Qwen3 (q/k norms) and Gemma 3 (text,
``Gemma3ForCausalLM``), their base models and subclasses.

    model = AutoModelForCausalLM.from_pretrained(...)
    kvsparse.patch(model, method="quest", token_budget=1024, page_size=16)
    out = model.generate(**inputs, max_new_tokens=64)
    kvsparse.patch(model, method="sparq", compression=1/8)    # or r=16, k=512
    kvsparse.patch(model, method="qaq", sigma=0.01)           # per-token bit-widths, packed cache
    kvsparse.unpatch(model)          # the original attention, bit for bit

    with kvsparse.patched(model, token_budget=512):
        out = model.generate(**inputs, max_new_tokens=64)

How it plugs into transformers (4.57 through 5.x; the differences between
versions live in :mod:`kvsparse._compat`):

* The model is read in one place, :func:`kvsparse.geometry.read_model`, once
  per :func:`patch` and once per cache made (:func:`make_cache`, and each
  ``generate()``, so that a model moved after the patch is read where it is
  now): its attention modules, cache shapes, sliding-window layers, layer
  devices and dtype, as a :class:`~kvsparse.geometry.ModelGeometry` that is
  passed on to the cache (:class:`~kvsparse.cache.KVSparseCache`).

* An attention function is registered with transformers' ``AttentionInterface``
  (and the matching mask function with ``AttentionMaskInterface``) under the
  name ``"kvsparse"`` (``"kvsparse_<impl>"`` when the model's original
  implementation is not ``sdpa``), and the model is switched to it with
  ``model.set_attn_implementation``. ``unpatch`` switches back.
* A ``forward_pre_hook(with_kwargs=True)`` on each attention module forwards
  the layer's cache (the forward's ``cache`` or ``past_key_values`` argument,
  found from its signature) and the config to the attention
  function as extra keyword arguments (the attention module passes its
  ``**kwargs`` through). The hook is pure (no state), so it traces under
  ``torch.compile``.
* ``model._prepare_cache_for_generation`` is overridden on the instance so
  that ``generate()`` creates the method's cache (:class:`~kvsparse.cache.QuestCache`,
  :class:`~kvsparse.cache.SparQCache`, :class:`~kvsparse.cache.QAQCache`: the
  method's :func:`~kvsparse.cache.cache_class`; dynamic;
  static when ``max_cache_len`` is configured or
  ``cache_implementation="static"`` is requested). A cache can also be made
  with :func:`make_cache` and passed as ``past_key_values=``.

The attention function (what is particular to a method comes from its
:class:`~kvsparse.methods.base.Method` in :mod:`kvsparse.methods`):

* multi-token calls (prefill): the model's original dense attention on the
  key/value states it was given (exactly what the unpatched model computes);
  then the cache stores the tokens, compacting out the padding read from the
  last row of the attention mask. A prefill that continues a non-empty cache
  attends to the stored (compacted) tokens with a mask built from
  ``seq_lens`` (the method's ``continuation_kv``: QAQ dequantizes them).
  Then the method's ``after_prefill`` (QAQ: the last ``window`` query rows'
  attention weights, recomputed from the prefill's query states and the
  stored keys, choose the prompt's widths).
* single-token calls (decode): the method's ``decode`` over the cache
  (Quest: ``kvsparse.quest.attention``; SparQ: ``kvsparse.sparq.attention``;
  QAQ: :func:`kvsparse.qaq.attention` on the packed codes, every
  ``requant_every`` steps lowering widths, the dynamic cache compacting
  its arena from time to time, host side). Layers ``< dense_layers`` use the
  same kernel with a budget that covers the whole buffer (Quest: every page;
  SparQ: ``k`` = the capacity, no reallocation; QAQ: the largest width):
  exact dense attention over ``[0, seq_lens[b])``. No host synchronisation,
  static shapes.
* without a kvsparse cache (e.g. ``model(...)`` with the default cache): the
  original attention.

Sliding windows:

* hybrid models (``config.layer_types`` mixing ``"sliding_attention"`` and
  ``"full_attention"``: Gemma 3, Qwen2/Qwen3 with ``use_sliding_window``):
  the sliding layers keep transformers' own sliding-window cache layer and the
  model's own windowed attention (the kvsparse cache holds, at those indices,
  the layers ``DynamicCache`` / ``StaticCache`` would, see
  :attr:`~kvsparse.cache.KVSparseCache.native_layers`); the method runs on the
  full-attention layers.
* a window on every layer (Mistral with ``sliding_window``, no
  ``layer_types``): applied at prefill by the model's mask but not during
  decode: the method's cache keeps every token.

Scaling: the attention uses the ``scaling`` its module passes (Gemma 3:
``query_pre_attn_scalar ** -0.5``), ``head_dim ** -0.5`` only when none is
passed.

Head dims: the CPU kernels take any multiple of 8 in [8, 256]; the CUDA
kernels (``check_head_dim`` in ``csrc/ops/checks.h``) take head_dim 64, 80,
96, 128 or 256 (:data:`CUDA_HEAD_DIMS`), except QAQ's attention (methods
``qaq`` and ``quest_qaq``), which takes 64, 96, 128 or 256
(:func:`cuda_head_dims` gives a method's set). A model whose head dim has no
kernel on the device of one of its layers makes :func:`patch` and
:func:`make_cache` raise :class:`~kvsparse._compat.IntegrationError` naming
the head dim, the layers, the device and the supported head dims, unless the
config says ``fallback="dense"`` (``kvsparse.patch(model, ...,
fallback="dense")``): then those layers run the model's dense attention on
transformers' cache layer, with a ``UserWarning`` naming the method and the
head dim (never silently).
"""
import contextlib
import logging
import sys
import types
import warnings

import torch

from . import _compat, methods
from .cache import KVCacheLayer, KVSparseCache
from .config import MethodConfig, make_config
from .geometry import read_model, supported_models
from .methods.base import CUDA_HEAD_DIMS as _CUDA_HEAD_DIMS
from .parts import is_compiling

__all__ = ["patch", "unpatch", "patched", "is_patched", "make_cache", "cache_kwargs", "output_cache", "report", "supported_models", "CUDA_HEAD_DIMS",
           "cuda_head_dims"]

#: head dims the CUDA kernels are instantiated for (``check_head_dim`` in
#: csrc/ops/checks.h); a method may take fewer (:func:`cuda_head_dims`: QAQ's
#: attention takes no 80)
CUDA_HEAD_DIMS = _CUDA_HEAD_DIMS


def cuda_head_dims(method):
    """The head dims the CUDA kernels of ``method`` (a registered method's
    name or a config) take: :attr:`kvsparse.methods.Method.cuda_head_dims`."""
    name = method.method if isinstance(method, MethodConfig) else method
    return tuple(methods.get(name).cuda_head_dims)


_STATE_ATTR = "_kvsparse_state"
#: on the model config: False when a full-attention layer is left to
#: transformers' attention (it needs the decode mask; see make_cache)
_MASK_FREE_ATTR = "_kvsparse_mask_free"


# ----------------------------------------------------------- attention function
def _original_attention(impl, module):
    """The attention function of implementation ``impl`` for ``module``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager" or impl not in ALL_ATTENTION_FUNCTIONS:
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"kvsparse: no eager attention for {type(module).__name__}")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _valid_from_mask(mask, seen, length, batch):
    """Bool ``[B, length]``: which of the new tokens (mask columns
    ``seen .. seen+length-1``) are not padding, from the last query row.
    ``None`` when every token is valid."""
    if mask is None or not torch.is_tensor(mask):
        return None
    if mask.dim() == 4:
        row = mask[:, 0, -1, :]
    elif mask.dim() == 2:  # flash-attention style padding mask [B, kv]
        row = mask
    else:
        return None
    row = row[:, seen:seen + length]
    if row.shape[-1] != length:
        return None
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2 if row.is_floating_point() else row != 0
    return row.expand(batch, length)


def _continuation_attention(module, query, layer, start, valid, seen, scaling, kv, **kwargs):
    """A multi-token call on a non-empty cache (a later turn, a prefill
    chunk): attend to the stored tokens (compacted) and the new ones,
    causally. When every sequence continues at the same length with no
    padding (B = 1, a chunked prefill), one SDPA call with a lower-right
    causal bias and grouped heads: no ``[L, T]`` mask, no expanded K/V
    (flash attention on the GPU). Otherwise transformers' SDPA attention with
    an explicit bool mask.
    ``kv``: the stored ``(keys, values)``, from the method's
    :meth:`~kvsparse.methods.base.Method.continuation_kv`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, L, _ = query.shape
    T = min(seen + L, layer.capacity)
    keys, values = kv
    if T == seen + L and not is_compiling() and bool((start == seen).all()) and (valid is None or bool(valid.all())):
        # every sequence continues at the same length with no padding (e.g. B = 1, chunked
        # prefill): causal aligned at the lower right, no [L, T] mask and no expanded K/V
        # (transients that would grow with the context; on the GPU flash attention)
        from torch.nn.attention.bias import causal_lower_right

        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys.to(query.dtype), values.to(query.dtype), attn_mask=causal_lower_right(L, T), scale=scaling,
            enable_gqa=keys.shape[1] != H)
        return out.transpose(1, 2).contiguous(), None
    if valid is None:
        upto = torch.arange(1, L + 1, device=query.device, dtype=torch.int32).expand(B, L)
    else:
        upto = valid.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
    limit = (start.view(B, 1) + upto).clamp(min=1)  # [B, L]; >= 1 so no row is empty
    mask = torch.arange(T, device=query.device).view(1, 1, T) < limit.view(B, L, 1)
    return sdpa_attention_forward(module, query, keys, values, mask.unsqueeze(1), scaling=scaling, dropout=0.0, **kwargs)


def _below_dense_length(layer, cfg):
    """Whether this step's length is at most the config's ``dense_length()``:
    the capacity of a static layer (fixed, so a compiled step never
    switches), the host token count of a dynamic one (no device read).
    Short steps only: one SDPA call has too few blocks to read a long cache
    quickly, so ``dense_layers`` stay on the method's kernel with a budget
    covering every token."""
    limit = cfg.dense_length()
    if limit <= 0:
        return False
    n = layer.capacity if layer.is_compileable else min(layer.tokens_seen(), layer.capacity)
    return n <= limit


def _dense_decode(query, layer, scaling):
    """Exact attention of one decode token per sequence over slots
    ``[0, seq_lens[b])`` of the layer's buffers, with one SDPA call: the ``G``
    query heads of each KV head are its query rows (no K/V expansion for
    GQA); the mask comes from ``seq_lens`` (no host read). ``[B, 1, H, D]``."""
    B, H, _, D = query.shape
    Hkv = layer.num_heads
    T = layer.capacity if layer.is_compileable else min(layer.tokens_seen(), layer.capacity)
    q = query.reshape(B, Hkv, H // Hkv, D).to(layer.dtype)
    mask = torch.arange(T, device=query.device).view(1, 1, 1, T) < layer.seq_lens.view(B, 1, 1, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, layer.keys[:, :, :T], layer.values[:, :, :T], attn_mask=mask, scale=scaling)
    return out.reshape(B, 1, H, D).to(query.dtype)


def _method_for(layer, cfg):
    """The method of ``cfg`` when ``layer`` is a kvsparse layer of that method, else ``None``."""
    method = methods.get(cfg.method)
    return method if isinstance(layer, KVCacheLayer) and layer.method == method.name else None


def _not_reached(cfg, what):
    method = getattr(cfg, "method", "?")
    return _compat.IntegrationError(
        f"kvsparse: the model is patched for {method!r} but {what} "
        f"(transformers {_compat.transformers_version()}); the step would run dense attention"
    )


def _make_attention_function(impl):
    def kvsparse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if "kvsparse_config" not in kwargs:
            raise _compat.IntegrationError(
                f"kvsparse: {type(module).__name__} called the kvsparse attention without the patch's "
                f"pre-hook (transformers {_compat.transformers_version()}): patch the model with kvsparse.patch"
            )
        cache = kwargs.pop("kvsparse_cache", None)
        cfg = kwargs.pop("kvsparse_config")
        dense_fn = _original_attention(impl, module)
        decoding = query.shape[2] == 1
        if cache is None:
            # no cache at all (use_cache=False): every call is a full forward,
            # which the method computes densely too
            return dense_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if not isinstance(cache, KVSparseCache):
            if _held_before(cache, module.layer_idx, query.shape[-2]):
                raise _not_reached(
                    cfg, f"the cache is a {type(cache).__name__}, not a kvsparse cache (let generate() make "
                    "it, or pass kvsparse.make_cache(model, ...))")
            # a prefill into a foreign cache is what the method computes too
            return dense_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if module.layer_idx >= len(cache.layers):
            raise _not_reached(cfg, f"the cache has {len(cache.layers)} layers and layer {module.layer_idx} ran")
        if module.layer_idx in cache.native_layers:
            # left to transformers by design (a sliding-window layer of a hybrid
            # model; a head dim without a kernel on this device, warned about by
            # make_cache): the model's own attention on transformers' cache layer
            return dense_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer = cache.layers[module.layer_idx]
        method = _method_for(layer, cfg)
        if method is None:
            raise _not_reached(
                cfg, f"the cache is a {type(cache).__name__} (layer {type(layer).__name__}) made for "
                f"{getattr(cache.config, 'method', '?')!r}; make it with kvsparse.make_cache(model, ...)")

        if scaling is None:
            scaling = module.head_dim ** -0.5
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        if needs_grad and (decoding and layer.pending is None or layer.tokens_seen() > 0):
            layer.pending = None
            layer.awaiting_attention = False
            raise ValueError(
                f"kvsparse: the {cfg.method!r} attention of layer {module.layer_idx} has no backward: a decode "
                "step or a prefill that continues a cache reads the compressed cache, which gradients cannot "
                "flow through, and the query/key/value states require grad; run the model under "
                "torch.no_grad() or torch.inference_mode() (generate() does), or call "
                "model.requires_grad_(False)")
        if decoding and layer.pending is None:
            # decode: the token is already in the buffers
            if not is_compiling():
                layer.awaiting_attention = False
            dense = module.layer_idx < cfg.dense_layers
            if _below_dense_length(layer, cfg):
                return _dense_decode(query, layer, scaling), None
            if getattr(layer, "always_dense", False):
                raise _not_reached(
                    cfg, f"layer {module.layer_idx} of the cache was made with a config that runs its whole "
                    f"length ({layer.capacity}) densely and keeps no side data; make the cache from the "
                    "patched model's config (kvsparse.make_cache(model, ...))")
            q = query.squeeze(2).contiguous()
            return method.decode(q, layer, cfg, dense, scaling).unsqueeze(1), None

        # prefill
        B, _, L, _ = query.shape
        seen = layer.tokens_seen()
        valid = _valid_from_mask(attention_mask, seen, L, B)
        start, seen = layer.commit(valid)
        if seen == 0:
            mask = attention_mask
            if torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[-1] > key.shape[-2]:
                mask = mask[..., : key.shape[-2]]  # static caches size the mask to max_cache_len
            out = dense_fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        else:
            kv = method.continuation_kv(layer, seen + L)
            out = _continuation_attention(module, query, layer, start, valid, seen, scaling, kv, **kwargs)
            del kv  # one layer's (dequantized) past: gone before the side data's update runs
        with torch.no_grad():  # the cache's side data takes no gradient; ``out`` above keeps its own
            method.after_prefill(layer, query.detach(), start, valid, seen, scaling)
        return out

    kvsparse_attention.__name__ = f"kvsparse_attention_{impl}"
    return kvsparse_attention


_REGISTERED = {}


def _register(impl):
    """Register (once) the kvsparse attention wrapping ``impl``; returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = "kvsparse" if impl == "sdpa" else f"kvsparse_{impl}"
    if name not in _REGISTERED:
        AttentionInterface.register(name, _make_attention_function(impl))
        mask_impl = impl if impl in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
        AttentionMaskInterface.register(
            name, _decode_free_mask(ALL_MASK_ATTENTION_FUNCTIONS[mask_impl], prefill_free=impl == "sdpa"))
        _REGISTERED[name] = impl
    return name


def _unpadded(attention_mask):
    """Whether a 2-D padding mask (or its absence) keeps every token (a host
    read: prefill only, never under compile)."""
    if attention_mask is None:
        return True
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2 or is_compiling():
        return False
    return bool(attention_mask.all())


def _decode_free_mask(mask_fn, prefill_free=False):
    """``mask_fn`` except for causal masks that no kvsparse layer reads, which
    are ``None``:

    * one-token (decode) masks: a kvsparse decode step reads ``seq_lens``,
      never the mask, and building a ``[B, 1, 1, max_cache_len]`` mask each
      step is work that grows with the cache;
    * with ``prefill_free`` (the SDPA attention), multi-token masks without
      padding: a static cache sizes them ``[L, max_cache_len]`` (8 GiB of bools
      for an 8k-token chunk of a 1M-token cache), yet a kvsparse layer's first
      prefill attends to its own ``L`` keys (SDPA's ``is_causal``) and a
      continuation builds its own lower-right causal attention
      (:func:`_continuation_attention`).

    Only where no layer of transformers' own reads a full causal mask (the
    config flag set by :func:`patch`); sliding-window and other masks are built
    as before."""
    from transformers.masking_utils import causal_mask_function

    def mask(*args, **kwargs):
        q = kwargs.get("q_length", kwargs.get("cache_position", args[1] if len(args) > 1 else None))
        if (q is not None and kwargs.get("mask_function") is causal_mask_function
                and getattr(kwargs.get("config"), _MASK_FREE_ATTR, True)):
            if _compat.query_length(q) == 1:
                return None
            if prefill_free and _unpadded(kwargs.get("attention_mask")):
                return None
        return mask_fn(*args, **kwargs)

    mask.__name__ = f"kvsparse_{getattr(mask_fn, '__name__', 'mask')}"
    return mask


def _held_before(cache, layer_idx, new_tokens):
    """Whether a foreign cache held tokens of this layer before this call's
    ``new_tokens`` (a multi-token call is then a continuation, which the
    method would not compute densely)."""
    try:
        return int(cache.get_seq_length(layer_idx)) > new_tokens
    except Exception:  # noqa: BLE001 - a cache without lengths: treat as a prefill
        return False


def _kvsparse_pre_hook(cfg, name, index):
    """Forward the layer's cache (the forward's parameter ``name``, positional
    index ``index`` after ``self``; see :func:`kvsparse._compat.cache_kwarg`)
    and the config to the attention function."""
    def hook(module, args, kwargs):
        cache = kwargs.get(name)
        if cache is None and index is not None and len(args) > index:
            cache = args[index]
        new_kwargs = dict(kwargs)
        new_kwargs["kvsparse_cache"] = cache
        new_kwargs["kvsparse_config"] = cfg
        return args, new_kwargs

    return hook


def _set_attn_implementation(model, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(
            f"kvsparse: could not switch {type(model).__name__} to attention implementation {name!r}"
        )


# ------------------------------------------------------------------- caches
def _kernel_supports(head_dim, device, method):
    """Whether the kernels of ``method`` (a registered method's name) run
    ``head_dim`` on ``device`` (CUDA: :func:`cuda_head_dims`; the CPU kernels
    take every head dim a model has, multiples of 8 up to 256, and report
    others themselves)."""
    return torch.device(device).type != "cuda" or int(head_dim) in cuda_head_dims(method)


def _dims_text(dims):
    dims = [str(d) for d in dims]
    return dims[0] if len(dims) == 1 else f"{', '.join(dims[:-1])} or {dims[-1]}"


def _native_layers(geometry, config, device=None, warn=True):
    """The layers a cache for the model of ``geometry`` leaves to
    transformers' own cache layers: the sliding layers of a hybrid model and,
    with ``config.fallback == "dense"`` (and a warning, unless not
    ``warn``), the layers on a device (``device``, else each layer's own)
    whose kernels lack the head dim (CUDA, head_dim not in
    :func:`cuda_head_dims`). Without the fallback such layers raise
    :class:`~kvsparse._compat.IntegrationError` naming the head dim, the
    layers, their devices and the supported head dims."""
    if device is not None:
        geometry = geometry.on_device(device)
    native = set(geometry.sliding_layers)
    head_dim = geometry.head_dim
    no_kernel = sorted(i for i in range(geometry.num_layers)
                       if i not in native and not _kernel_supports(head_dim, geometry.layer_device(i), config.method))
    if no_kernel:
        devices = sorted({str(geometry.layer_device(i)) for i in no_kernel})
        dims = _dims_text(cuda_head_dims(config.method))
        if getattr(config, "fallback", None) != "dense":
            raise _compat.IntegrationError(
                f"kvsparse: {config.method} has no CUDA kernel for head_dim {head_dim} on {', '.join(devices)}: "
                f"layers {no_kernel} cannot run it ({config.method}'s CUDA kernels take head_dim {dims}). "
                f"Pass fallback=\"dense\" (kvsparse.patch(model, {config.method!r}, ..., fallback=\"dense\")) to "
                "run these layers with the model's dense attention on transformers' cache layers, or run "
                "them on the CPU"
            )
        if warn:
            warnings.warn(
                f"kvsparse: {config.method} has no CUDA kernel for head_dim {head_dim} on {', '.join(devices)} "
                f"(its CUDA kernels take head_dim {dims}): with fallback=\"dense\", layers {no_kernel} fall back "
                "to the model's dense attention on transformers' cache layers",
                UserWarning, stacklevel=4,
            )
        native.update(no_kernel)
    return sorted(native)


def make_cache(model, batch_size=None, max_cache_len=None, config=None, dtype=None, device=None):
    """The kvsparse cache of the configured method for ``model`` (the
    method's :func:`~kvsparse.cache.cache_class`:
    :class:`~kvsparse.cache.QuestCache`, :class:`~kvsparse.cache.SparQCache`,
    :class:`~kvsparse.cache.QAQCache`).

    Args:
        model: a (patched) supported model.
        batch_size: when given, the buffers are allocated now (with the
            model's dtype and device, or ``dtype``/``device``); otherwise at
            the first forward.
        max_cache_len: an int gives a static (preallocated, compileable)
            cache of that many tokens per sequence; default
            ``config.max_cache_len`` (``None``: dynamic, grown in chunks).
        config: default ``model.kvsparse_config`` (or ``QuestConfig()``).
        dtype, device: of the buffers when ``batch_size`` is given (default:
            the model's).

    Pass it to ``model.generate(..., past_key_values=cache)`` or to the
    model's forward. The model must be patched for the cache to be read
    correctly.

    The sliding-window layers of a hybrid model (Gemma 3) get transformers'
    own cache layers; ``cache.native_layers`` lists them. Layers placed on
    CUDA when the model's head dim has no CUDA kernel of the method (see
    :func:`cuda_head_dims`) raise :class:`~kvsparse._compat.IntegrationError`,
    or, with ``config.fallback == "dense"``, get transformers' cache layers
    too (the model's dense attention), with a ``UserWarning``.
    """
    if config is None:
        config = getattr(model, "kvsparse_config", None) or make_config()
    if not isinstance(config, MethodConfig) or config.method not in methods.names():
        kinds = ", ".join(m.config_class.__name__ for m in methods.registered())
        raise TypeError(f"kvsparse: make_cache needs a method config ({kinds}), got {type(config).__name__}")
    return _make_cache(model, read_model(model), config, batch_size, max_cache_len, dtype, device)


def _make_cache(model, geometry, config, batch_size=None, max_cache_len=None, dtype=None, device=None):
    """:func:`make_cache` for the model of ``geometry`` (read by :func:`~kvsparse.geometry.read_model`)."""
    methods.get(config.method).check_model(config, geometry.head_dim)
    native = _native_layers(geometry, config, device=device if batch_size is not None else None)
    # a full-attention layer left to transformers (no kernel for its head dim)
    # reads the decode mask: keep building it for this model
    full_native = set(native) - set(geometry.sliding_layers)
    object.__setattr__(model.config, _MASK_FREE_ATTR, not full_native)
    cache = KVSparseCache.for_config(config, max_cache_len=max_cache_len, geometry=geometry, native_layers=native)
    if batch_size is not None:
        cache.allocate(batch_size, dtype=dtype, device=device)
    return cache


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
    """Instance override of ``GenerationMixin._prepare_cache_for_generation``:
    make ``generate()`` use the kvsparse cache of the configured method."""
    original = type(self)._prepare_cache_for_generation
    impl = generation_config.cache_implementation
    key = self.__dict__[_STATE_ATTR]["cache_kwarg"]
    if (
        any(model_kwargs.get(k) is not None for k in _compat.CACHE_KWARGS)
        or generation_config.use_cache is False
        or impl not in (None, "dynamic") + _compat.static_cache_names()
    ):
        # another cache kind (offloaded, quantized, ...): transformers makes it,
        # and the first decode step over it raises IntegrationError
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
    cfg = self.kvsparse_config
    max_len = cfg.max_cache_len
    if impl in _compat.static_cache_names():
        max_len = max(max_cache_length, _compat.generation_max_cache_len(generation_config) or 0, max_len or 0)
    elif max_len is not None and max_len < max_cache_length:
        raise ValueError(
            f"kvsparse: max_cache_len={max_len} is smaller than the generation length {max_cache_length}"
        )
    cache_batch = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
    model_kwargs[key] = make_cache(self, batch_size=cache_batch, max_cache_len=max_len, config=cfg)


def _ranges(idx):
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, idx = [], sorted(idx)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(out) or "none"


def report(model):
    """What the patch does to ``model``, in a few lines (``None`` when it is
    not patched): the config, which layers run the method and which are left
    to transformers, the ``dense_layers`` that attend every token, the
    lengths that run dense (``dense_below``), and how a Quest budget rounds
    to whole pages. :func:`patch` also logs it (logger ``"kvsparse"``, INFO)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return None
    cfg = model.kvsparse_config
    geometry = state["geometry"]
    native = set(geometry.sliding_layers)
    own = [i for i in range(geometry.num_layers) if i not in native]
    lines = [f"kvsparse: {type(model).__name__} patched with {cfg!r}",
             f"  layers {_ranges(own)} ({len(own)} of {geometry.num_layers}): the {cfg.method} cache and decode"]
    if cfg.dense_layers:
        first = [i for i in own if i < cfg.dense_layers]  # as the attention reads it: layer_idx < dense_layers
        lines.append(f"  of them, layers {_ranges(first)} (dense_layers={cfg.dense_layers}) attend every token")
    if native:
        lines.append(f"  layers {_ranges(native)}: sliding-window layers, left to transformers' attention and "
                     "cache layers (their window holds the cache short)")
    dense_len = cfg.dense_length()
    if dense_len > 0:
        lines.append(f"  a decode step over at most {dense_len} cached tokens runs exact dense attention "
                     "(dense_below; 0 turns it off)")
    budget, page = getattr(cfg, "token_budget", None), getattr(cfg, "page_size", None)
    if budget is not None and page and budget % page:
        lines.append(f"  token_budget {budget} is read as {budget // page} pages of {page} = "
                     f"{budget // page * page} tokens")
    devices = sorted({str(geometry.layer_device(i)) for i in own})
    lines.append(f"  head_dim {geometry.head_dim}, {geometry.num_heads} heads, {geometry.num_kv_heads} KV heads; "
                 f"on {', '.join(devices)}")
    return "\n".join(lines)


def cache_kwargs(model, cache):
    """``{name: cache}``, to pass a cache to ``model(...)`` or ``model.generate(...)``
    under the keyword the installed transformers takes (``cache`` from 5.24,
    ``past_key_values`` before; the old name warns of its deprecation)::

        out = model(ids, **kvsparse.cache_kwargs(model, cache))
    """
    return _compat.model_cache_kwargs(model, cache)


def output_cache(out):
    """The cache that a model or ``generate()`` output carries (its
    ``cache`` or ``past_key_values`` field, whichever the installed
    transformers fills)."""
    return _compat.output_cache(out)


# -------------------------------------------------------------- patch/unpatch
def is_patched(model):
    return _STATE_ATTR in model.__dict__


def patch(model, method="quest", config=None, self_check=True, **kwargs):
    """Make ``model`` use sparse decode attention (in place); returns ``model``.

    Args:
        model: ``LlamaForCausalLM``, ``MistralForCausalLM``,
            ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or ``Gemma3ForCausalLM``
            (or their base models / subclasses; :func:`supported_models`).
            Gemma 3's sliding-window layers keep their own attention (see
            the module docstring). On CUDA, a head dim outside the
            method's :func:`cuda_head_dims` raises
            :class:`~kvsparse._compat.IntegrationError` naming the head dim,
            the layers, the device and the supported head dims, unless
            ``fallback="dense"`` (a config field, see
            :class:`~kvsparse.config.MethodConfig`): then those layers run the
            model's dense attention, with a warning.
        method: a registered method's name (``kvsparse.methods.names()``:
            ``"quest"``, ``"sparq"``, ``"qaq"``, ``"quest_qaq"``: Quest's page
            selection over QAQ's packed cache), or a config object.
        config: a config object (:class:`~kvsparse.config.QuestConfig`,
            :class:`~kvsparse.config.SparQConfig`, :class:`~kvsparse.config.QAQConfig`,
            :class:`~kvsparse.config.QuestQAQConfig`);
            ``kwargs`` override its fields.
        **kwargs: the config fields (every method: ``dense_layers``,
            ``max_cache_len``, ``chunk_size``, ``fallback``; Quest: ``token_budget``, ``page_size``,
            ...; SparQ: ``compression`` or ``r`` and ``k``, ``local_window``,
            ``reallocate``, ...; QAQ: ``sigma`` or ``sigma_k`` / ``sigma_v``,
            ``allowed``, ``alpha``, ``window``, ``shared``, ``uniform_bits``, ...).

        self_check: run a 4-token prefill and one decode step on a fresh
            cache and raise :class:`~kvsparse._compat.IntegrationError` if
            any layer did not go through the kvsparse attention (e.g. a
            transformers release that passes the cache differently).

    The config is stored as ``model.kvsparse_config``; :func:`report`
    says what the patch does (which layers, which lengths run dense, how a
    budget rounds), and is logged at INFO (logger ``"kvsparse"``). Patching
    a patched model replaces its config.

    Never silently dense: besides the self-check, a decode step over a cache
    that is not the method's kvsparse cache, a prefill that the kvsparse
    attention did not commit, and (outside ``torch.compile``) a decode token
    the kvsparse attention did not read all raise
    :class:`~kvsparse._compat.IntegrationError`.
    """
    if config is not None:
        cfg = make_config(config, **kwargs)
    else:
        cfg = make_config(method, **kwargs)
    if cfg.method not in methods.names():  # pragma: no cover
        raise ValueError(f"kvsparse: method {cfg.method!r} is not supported by patch()")
    # the model, read once: its attention modules (hooked below) and the
    # geometry the self-check's cache is built from
    geometry = read_model(model)
    methods.get(cfg.method).check_model(cfg, geometry.head_dim)
    # a head dim without a kernel on a layer's device raises here, before any hook
    # (with fallback="dense" the caches made later warn)
    _native_layers(geometry, cfg, warn=False)
    attn_modules = geometry.attention_modules
    if is_patched(model):
        unpatch(model)

    # the cache's parameter name in the forwards (transformers-dependent)
    model_key, _ = _compat.cache_kwarg(type(model).forward, f"{type(model).__name__}.forward")
    attn_keys = {type(m): _compat.cache_kwarg(type(m).forward, f"{type(m).__name__}.forward") for m in attn_modules}

    original_impl = model.config._attn_implementation
    name = _register(original_impl)
    state = {
        "original_impl": original_impl,
        "cache_kwarg": model_key,
        "hooks": [],
        "compiled": {k: model.__dict__[k] for k in ("_compiled_call", "_last_compile_config") if k in model.__dict__},
        "geometry": geometry,
    }
    for k in state["compiled"]:
        del model.__dict__[k]  # compile afresh for the patched model
    try:
        _set_attn_implementation(model, name)
        hooks = {cls: _kvsparse_pre_hook(cfg, *key) for cls, key in attn_keys.items()}
        for m in attn_modules:
            state["hooks"].append(m.register_forward_pre_hook(hooks[type(m)], with_kwargs=True))
        if hasattr(type(model), "_prepare_cache_for_generation"):
            model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
        model.kvsparse_config = cfg
        model.__dict__[_STATE_ATTR] = state
        if self_check:
            _self_check(model, cfg, geometry)
        logging.getLogger("kvsparse").info("%s", report(model))
    except Exception:
        for h in state["hooks"]:
            h.remove()
        for k in ("_prepare_cache_for_generation", "kvsparse_config", _STATE_ATTR):
            model.__dict__.pop(k, None)
        model.__dict__.update(state["compiled"])
        _set_attn_implementation(model, original_impl)
        raise
    return model


@torch.no_grad()
def _self_check(model, cfg, geometry):
    """A 4-token prefill and one decode step on a fresh dynamic cache of the
    method: every layer must commit the prefill and read the decode token
    through the kvsparse attention, or :class:`~kvsparse._compat.IntegrationError`."""
    cache = _make_cache(model, geometry, cfg.replace(max_cache_len=None))
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0] if emb is not None else 8
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    ids = (torch.arange(1, 6, device=device) % max(vocab, 1)).view(1, 5)
    key = model.__dict__[_STATE_ATTR]["cache_kwarg"]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=ids[:, :4], use_cache=True, **{key: cache})
        for i, layer in cache.kvsparse_layers():
            if not layer.is_initialized or layer.pending is not None:
                raise _not_reached(cfg, f"its self-check prefill was not stored by the kvsparse attention of "
                                        f"layer {i} (the cache argument {key!r} did not reach it)")
        model(input_ids=ids[:, 4:], use_cache=True, **{key: cache})
        for i, layer in cache.kvsparse_layers():
            if layer.awaiting_attention or int(layer.seq_lens[0]) != 5:
                raise _not_reached(cfg, f"its self-check decode step did not read layer {i} through the "
                                        "kvsparse attention")
    finally:
        model.train(was_training)


def unpatch(model):
    """Undo :func:`patch` (no-op on an unpatched model); returns ``model``."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    for h in state["hooks"]:
        h.remove()
    for k in ("_prepare_cache_for_generation", "kvsparse_config", "_compiled_call", "_last_compile_config"):
        model.__dict__.pop(k, None)
    model.config.__dict__.pop(_MASK_FREE_ATTR, None)
    model.__dict__.update(state["compiled"])
    _set_attn_implementation(model, state["original_impl"])
    return model


@contextlib.contextmanager
def patched(model, method="quest", config=None, **kwargs):
    """Context manager: ``patch`` on entry, ``unpatch`` on exit."""
    patch(model, method=method, config=config, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)
