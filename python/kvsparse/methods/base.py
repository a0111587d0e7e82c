"""What a method is to kvsparse, and the registry of the methods.

A method (Quest, SparQ, QAQ, ...) is one :class:`Method` object, registered
under its name with :func:`register` and found with :func:`get`. Its module
(``kvsparse/methods/<name>.py``) holds everything that is particular to it:

* its config, a :class:`MethodConfig` dataclass (the fields every method
  has, ``dense_layers``, ``max_cache_len``, ``chunk_size`` and ``fallback``,
  live in :class:`MethodConfig`);
* the head dims its CUDA kernels take (:attr:`Method.cuda_head_dims`);
* what its cache layers hold (:meth:`Method.storage`: where the tokens
  are, by default dense K/V buffers; :meth:`Method.side_index`: the data
  kept beside them, e.g. Quest's page bounds), from which
  :mod:`kvsparse.cache` builds its transformers cache classes
  (:func:`kvsparse.cache.cache_class`, :func:`kvsparse.cache.layer_class`);
* its decode attention (:meth:`Method.decode`) and its prefill hooks
  (:meth:`Method.continuation_kv`, :meth:`Method.after_prefill`);
* the facts the evaluation needs (which field it sweeps, which fields fix
  the config, which change what a prefilled cache holds);
* the config fields under which its decode attention is dense attention
  (:meth:`Method.lossless_kwargs`, used by the contract tests that every
  registered method gets).

Nothing here imports transformers: the configs must load without it. Nor
does anything in :mod:`kvsparse.methods` import :mod:`kvsparse.cache` or
:mod:`kvsparse.config`: the dependency runs one way, from the cache (and the
configs' by-name lookup) to the methods.
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .._ops import CUDA_HEAD_DIMS as _CUDA_HEAD_DIMS
from ..parts import DenseKV

__all__ = ["Method", "MethodConfig", "check_int", "register", "get", "names", "registered",
           "CUDA_HEAD_DIMS", "FALLBACKS"]

#: head dims the CUDA kernels of Quest and SparQ are instantiated for
#: (``check_head_dim`` in csrc/ops/checks.h; defined once, in :mod:`kvsparse._ops`);
#: a method may take fewer (:attr:`Method.cuda_head_dims`: QAQ's attention takes no 80)
CUDA_HEAD_DIMS = _CUDA_HEAD_DIMS
#: the accepted values of :attr:`MethodConfig.fallback` besides ``None``
FALLBACKS = ("dense",)


def check_int(name, value, minimum=None):
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int (not a
    bool) and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"kvsparse: {name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"kvsparse: {name} must be >= {minimum}, got {value}")


@dataclass(repr=True, eq=True)
class MethodConfig:
    """The fields and behaviour every method config shares (subclasses are
    dataclasses too; a subclass may redeclare a field to change its default).

    Attributes:
        dense_layers: the first ``dense_layers`` decoder layers keep dense
            (exact) decode attention.
        max_cache_len: ``None``: the cache buffers grow in chunks as needed.
            An int: every buffer is allocated once at this length (static
            shapes and addresses, usable by ``torch.compile`` / CUDA graphs).
        chunk_size: growth granularity of the dynamic buffers, in tokens.
        fallback: what a layer whose head dim has no kernel on its device
            (CUDA, head dim not in the method's
            :attr:`Method.cuda_head_dims`) does. ``None`` (default):
            :func:`kvsparse.patch` and :func:`kvsparse.make_cache` raise
            :class:`~kvsparse._compat.IntegrationError` naming the head dim,
            the layers, the device and the supported head dims.
            ``"dense"``: those layers run the model's own dense attention
            on transformers' cache layers, with a ``UserWarning``.
    """

    #: method name used by :func:`kvsparse.make_config` and ``kvsparse.patch(method=...)``
    method = None

    dense_layers: int = 0
    max_cache_len: Optional[int] = None
    chunk_size: int = 256
    fallback: Optional[str] = None

    def to_dict(self):
        """The fields as a plain dict, plus ``"method"``."""
        return {"method": self.method, **asdict(self)}

    def replace(self, **changes):
        """A validated copy with some fields changed."""
        return type(self)(**{**asdict(self), **changes})

    def validate(self):
        """Check the shared fields (subclasses check theirs after calling this)."""
        check_int("dense_layers", self.dense_layers, 0)
        if self.max_cache_len is not None:
            check_int("max_cache_len", self.max_cache_len, 1)
        check_int("chunk_size", self.chunk_size, 1)
        if self.fallback is not None and self.fallback not in FALLBACKS:
            raise ValueError(f"kvsparse: fallback must be None or one of {', '.join(map(repr, FALLBACKS))}, "
                             f"got {self.fallback!r}")

    def dense_length(self):
        """Decode steps over at most this many cached tokens run one dense
        attention call instead of the method (0: never)."""
        return 0

    def __post_init__(self):
        self.validate()


class Method:
    """One sparse / quantized KV-cache method: subclass, set the attributes,
    override the hooks it needs, and :func:`register` an instance.

    Attributes:
        name: the registry key (``"quest"``); also ``config_class.method``.
        title: the prefix of its public class names (``"Quest"``:
            ``QuestConfig``, ``QuestCache``, ``QuestDynamicLayer``, ...).
        config_class: its :class:`MethodConfig` dataclass.
        sweep_kwarg: the config field the evaluation sweeps (``"token_budget"``).
        sweep_values: the evaluation's list of values it is swept over:
            ``"budgets"`` (ints), ``"compressions"`` or ``"sigmas"`` (floats).
        sweep_type: ``int`` or ``float``, the type of a swept value.
        no_sweep_kwargs: config fields that fix the configuration: a run
            that gives one of them is not swept.
        eval_defaults: config fields an evaluation run gets unless it sets them.
        eval_patch_defaults: config fields added at patch time in an evaluation
            unless the run sets them (not part of the run's label).
        nominal_ratio: ``None`` (the evaluation measures the cache's
            compression), or ``f(run, length)``: the fraction of a
            ``length``-token cache a decode step does not read.
        cache_kwargs: config fields that change what the method's cache holds
            after a (dense) prefill: runs agreeing on them can share one
            prefilled cache, built from transformers' dense cache. ``None``:
            the method's prefill is its own (QAQ chooses the widths from it),
            so a cache is never shared nor converted from a dense one.
        lossless_tolerance: ``(atol, rtol)`` of the logits under
            :meth:`lossless_kwargs` against the unpatched model (fp32).
        cache_methods: ``None``, or a mixin class of methods and properties
            that the method's cache class adds (QAQ: ``memory_report``,
            ``compact``).
        cuda_head_dims: the head dims every CUDA kernel of its decode path
            takes (default :data:`CUDA_HEAD_DIMS`); a layer of another head
            dim on CUDA raises at patch time or falls back to dense attention
            (:attr:`MethodConfig.fallback`).
    """

    name = None
    title = None
    config_class = MethodConfig
    sweep_kwarg = None
    sweep_values = "budgets"
    sweep_type = float
    no_sweep_kwargs = ()
    eval_defaults = {}
    eval_patch_defaults = {}
    nominal_ratio = None
    cache_kwargs = None
    lossless_tolerance = (2e-5, 1e-4)
    cache_methods = None
    cuda_head_dims = CUDA_HEAD_DIMS

    def __repr__(self):
        return f"<kvsparse method {self.name!r}>"

    # ---------------------------------------------------------------- config
    def make_config(self, **kwargs):
        """The validated config from its fields; an unknown field raises
        ``ValueError`` naming the valid ones."""
        cls = self.config_class
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(
                f"kvsparse: unknown option(s) {', '.join(unknown)} for method {self.name!r}; "
                f"valid: {', '.join(sorted(valid))}"
            )
        return cls(**kwargs)

    def check_model(self, config, head_dim):
        """Raise ``ValueError`` if ``config`` cannot run on a model of ``head_dim``."""

    def lossless_kwargs(self, head_dim, length):
        """Config fields under which a decode step over at most ``length``
        cached tokens (head dim ``head_dim``) is dense attention, up to
        :attr:`lossless_tolerance`; the method's own path runs (not the short
        dense fallback) in every layer."""
        raise NotImplementedError

    # ----------------------------------------------------------------- cache
    def storage(self, config, layer_idx, static):
        """A new storage :class:`~kvsparse.parts.Part` for layer ``layer_idx``
        of a dynamic or ``static`` cache: where the tokens are. Default: dense
        ``keys`` / ``values`` buffers (:class:`~kvsparse.parts.DenseKV`)."""
        return DenseKV()

    def side_index(self, config):
        """A new side index :class:`~kvsparse.parts.Part` kept beside the
        storage and updated from the new tokens, or ``None`` (default)."""
        return None

    def page_size(self, config):
        """Slot granularity of the cache layers: their capacity and growth
        chunk are multiples of it (Quest: its page size; default 1)."""
        return 1

    # ------------------------------------------------------------- attention
    def decode(self, q, layer, config, dense, scaling):
        """One decode step of layer ``layer`` of the method's cache: ``q``
        ``[B, H, D]`` (the new token is already stored) -> ``[B, H, D]``.
        ``dense``: the layer is one of ``config.dense_layers`` (exact attention)."""
        raise NotImplementedError

    def continuation_kv(self, layer, length):
        """``(keys, values)`` ``[B, Hkv, T, D]`` of the first ``T = min(length,
        capacity)`` slots, attended by a prefill that continues a non-empty
        cache (the stored tokens, compacted, then the new ones)."""
        T = min(int(length), layer.capacity)
        return layer.keys[:, :, :T], layer.values[:, :, :T]

    def after_prefill(self, layer, query, start, valid, seen, scaling):
        """Called after a prefill was stored (committed) in ``layer``:
        ``query`` ``[B, H, L, D]`` its query states, ``start`` the lengths before
        it, ``valid`` its non-padding tokens (or ``None``), ``seen`` the token
        columns before it."""


_REGISTRY = {}


def register(method):
    """Add ``method`` (a :class:`Method` instance) to the registry; returns it."""
    if not isinstance(method, Method) or not isinstance(method.name, str) or not method.name.islower():
        raise TypeError(f"kvsparse: register() takes a Method with a lower-case name, got {method!r}")
    if method.config_class.method != method.name:
        raise ValueError(f"kvsparse: {method.config_class.__name__}.method must be {method.name!r}")
    if method.name in _REGISTRY:
        raise ValueError(f"kvsparse: a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get(name):
    """The registered method called ``name`` (case-insensitive); ``ValueError``
    naming the supported ones otherwise."""
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"kvsparse: unknown method {name!r}; supported: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name.lower()]


def names():
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def registered():
    """The registered :class:`Method` objects, in registration order."""
    return tuple(_REGISTRY.values())
