r"""Hugging Face ``Cache`` classes holding the KV cache in the layout of the kvsparse ops.

Every method's cache is a :class:`KVSparseCache` of :class:`KVCacheLayer`\ s
(one class each, made from the method by :func:`method_classes`:
``QuestCache`` of ``QuestDynamicLayer`` / ``QuestStaticLayer``, ``SparQCache``,
``QAQCache``, ...; :func:`cache_class` and :func:`layer_class` give them). The
methods describe themselves and know nothing of this module; the cache is
built from what they say. A layer keeps the geometry, ``seq_lens`` (int32 ``[B]``
on the device, the number of valid tokens of each sequence: sequence ``b``
occupies slots ``[0, seq_lens[b])``) and the capacity, and is built from
parts (:mod:`kvsparse.parts`) that its method chooses
(:class:`kvsparse.methods.base.Method`):

* its **storage** (``layer.storage``): :class:`~kvsparse.parts.DenseKV`,
  ``keys`` / ``values`` ``[B, Hkv, capacity, D]`` buffers (Quest, SparQ), or
  QAQ's packed per-token quantized stores
  (:class:`~kvsparse.methods.qaq.QuantKV`: no fp16 K/V at all);
* its **side index** (``layer.side``), updated incrementally from the new
  tokens only: Quest's page key min / max
  (:class:`~kvsparse.methods.quest.QuestPages`, only the touched pages),
  SparQ's channel-major key copy and running value mean
  (:class:`~kvsparse.methods.sparq.SparQKeys`); none for QAQ;
* its **length policy** (``layer.lengths``):
  :class:`~kvsparse.parts.DynamicLengths` (``max_cache_len=None``): buffers
  grow in chunks of ``chunk_size`` tokens, by an eighth of the capacity (at
  least a chunk) when full, never a per-token concatenation of the whole
  cache; :class:`~kvsparse.parts.StaticLengths` (``max_cache_len=N``):
  buffers allocated once (static shapes and addresses, ``is_compileable =
  True``), as transformers' ``StaticLayer``, so that the decode step can run
  under ``torch.compile``.

The parts' data also read as the layer's attributes (``layer.keys``,
``layer.kmin``, ``layer.kt``, ``layer.ks``, ``layer.cumulative_length``, ...).

Left padding: at prefill the tokens of each sequence that are not padding are
stored compacted at the front of its buffer (the keys already carry their
rotary position, and attention does not depend on the order of the keys), so
padding is never attended afterwards and ``seq_lens[b]`` counts real tokens.
Decode appends each sequence's new token at slot ``seq_lens[b]`` (a scatter
with tensor indices: no host synchronisation) and increments ``seq_lens``.

Prefill protocol (with the patched attention of :mod:`kvsparse.hf`): for a
multi-token update the layer only records the new key/value states
(``pending``) and returns them unchanged, so that the model's dense attention
runs on exactly what it would have seen without the patch; the attention
function then calls :meth:`KVCacheLayer.commit` with the per-token
validity read from the attention mask, which compacts the tokens into the
storage and updates the side index. A pending prefill that was never committed
makes the next update raise :class:`~kvsparse._compat.IntegrationError`.

Use these caches only with a model patched by :func:`kvsparse.patch`: a decode
``update`` returns the whole buffers, whose valid part is described by
``seq_lens`` rather than by the attention mask.
"""
import operator
from collections import namedtuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _compat, methods
from .geometry import WINDOWED_LAYER_TYPES, ModelGeometry, cache_geometry, sliding_layers  # noqa: F401 (old home)
from .methods import MethodConfig
from .parts import DynamicLengths, StaticLengths, is_compiling, round_up

__all__ = [
    "KVCacheLayer", "KVSparseCache", "method_classes", "cache_class", "layer_class", "cache_geometry", "sliding_layers",
    "QuestCacheLayer", "QuestDynamicLayer", "QuestStaticLayer", "QuestCache",
    "SparQCacheLayer", "SparQDynamicLayer", "SparQStaticLayer", "SparQCache",
    "QAQCacheLayer", "QAQDynamicLayer", "QAQStaticLayer", "QAQCache",
]


class KVCacheLayer(CacheLayerMixin):
    """A kvsparse cache layer: transformers' cache-layer contract over the
    parts of its method (see the module docstring).

    Args:
        config: the method config (of the cache).
        max_cache_len: ``None``: a dynamic layer; an int: a static one
            preallocated at that many tokens.
        layer_idx: the decoder layer's index.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, config, max_cache_len=None, layer_idx=0):
        super().__init__()
        method = methods.get(config.method)
        static = max_cache_len is not None
        page_size = method.page_size(config)
        if page_size < 1:
            raise ValueError(f"kvsparse: page_size must be >= 1, got {page_size}")
        self.config = config
        self.layer_idx = int(layer_idx)
        self.page_size = int(page_size)
        self.chunk_size = round_up(max(int(config.chunk_size), 1), self.page_size)
        self.lengths = StaticLengths(max_cache_len) if static else DynamicLengths()
        self.storage = method.storage(config, self.layer_idx, static)
        self.side = method.side_index(config)
        self.capacity = 0
        self.seq_lens = None
        self.pending = None
        #: decode steps over at most this many tokens are dense attention (see :mod:`kvsparse.hf`)
        self.dense_length = config.dense_length()
        #: a decode token was appended and the kvsparse attention has not yet
        #: read it (checked outside torch.compile: see :meth:`update`)
        self.awaiting_attention = False
        #: number of buffer (re)allocations, for tests and diagnostics
        self.num_allocations = 0

    def __repr__(self):
        return f"{type(self).__name__}(layer={self.layer_idx}, page_size={self.page_size}, capacity={self.capacity})"

    @property
    def method(self):
        """The name of the layer's method."""
        return self.config.method

    @property
    def is_compileable(self):
        return self.lengths.is_compileable

    # ------------------------------------------------------------ the parts
    def _parts(self):
        return (self.storage,) if self.side is None else (self.storage, self.side)

    @property
    def keys(self):
        """The storage's key buffer (``None`` when it has none: QAQ)."""
        return self.storage.keys

    @keys.setter
    def keys(self, value):
        if value is not None:  # (CacheLayerMixin.__init__ sets None)
            raise AttributeError("kvsparse: a layer's keys are its storage's")

    @property
    def values(self):
        """The storage's value buffer (``None`` when it has none: QAQ)."""
        return self.storage.values

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("kvsparse: a layer's values are its storage's")

    def __getattr__(self, name):
        # the parts' data read as the layer's (layer.kmin, layer.ks, ...); only
        # called for what the layer itself lacks. kvsparse's own code names the part.
        if not name.startswith("_"):
            for key in ("storage", "side", "lengths"):
                value = getattr(self.__dict__.get(key), name, _MISSING)
                if value is not _MISSING:
                    return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def state_tensors(self):
        """Every tensor the layer holds (a static layer fixes their addresses)."""
        out = [self.seq_lens, *self.lengths.tensors()]
        for part in self._parts():
            out.extend(part.tensors())
        return out

    # ----------------------------------------------------------------- setup
    def lazy_initialization(self, key_states, value_states=None):
        if value_states is None:  # transformers 4.57 passes the keys alone
            value_states = key_states
        if key_states.shape[-1] != value_states.shape[-1]:
            raise ValueError(
                "kvsparse: keys and values must have the same head dim, got "
                f"{key_states.shape[-1]} and {value_states.shape[-1]}"
            )
        self.model_dtype, self.device = key_states.dtype, key_states.device
        self.dtype = self.storage.store_dtype(key_states.dtype)
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.head_dim = key_states.shape[-1]
        self.seq_lens = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)
        for part in self._parts():
            part.init(self)
        self.is_initialized = True
        self.lengths.init(self)

    def _allocate(self, capacity):
        """(Re)allocate every part at ``capacity`` tokens, keeping the content."""
        for part in self._parts():
            part.allocate(self, capacity)
        self.capacity = capacity
        self.num_allocations += 1

    # ---------------------------------------------------------------- lengths
    def tokens_seen(self):
        """Host int: token columns processed so far, padding included (an upper
        bound of ``seq_lens``). May synchronise (static layers)."""
        return self.lengths.tokens_seen(self)

    def get_seq_length(self):
        return self.lengths.get_seq_length(self)

    def get_mask_sizes(self, query_length):
        return self.lengths.get_mask_sizes(query_length)

    def get_max_length(self):
        return self.lengths.get_max_length()

    def get_max_cache_shape(self):  # the name of get_max_length up to transformers 5.12
        return self.get_max_length()

    # ---------------------------------------------------------------- update
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise _compat.IntegrationError(
                f"kvsparse: a prefill stored in {type(self).__name__} was never committed by the kvsparse "
                f"attention (transformers {_compat.transformers_version()}): the model is not patched "
                "(kvsparse.patch), or this transformers version's attention did not reach the patch"
            )
        if key_states.shape[-2] == 1:
            if not is_compiling():
                if self.awaiting_attention:
                    raise _compat.IntegrationError(
                        f"kvsparse: the previous decode step did not read {type(self).__name__} through the "
                        f"kvsparse attention (transformers {_compat.transformers_version()}): the model is not "
                        "patched (kvsparse.patch), or this version's attention did not reach the patch"
                    )
                self.awaiting_attention = True
            return self._append_one(key_states, value_states)
        # Multi-token update (prefill): record it; the attention function
        # commits it with the validity of each token.
        self.pending = (key_states, value_states)
        return key_states, value_states

    def _append_one(self, key_states, value_states):
        """Decode: append one token per sequence at slot ``seq_lens[b]``."""
        self.lengths.reserve_decode(self)
        pos = self.seq_lens.to(torch.int64)
        new_lens = self.seq_lens + 1
        if self.is_compileable:
            # never write out of bounds (a full static cache overwrites its last slot)
            pos = pos.clamp(max=self.capacity - 1)
            new_lens = new_lens.clamp(max=self.capacity)
        key_states, value_states = key_states.detach(), value_states.detach()  # the cache holds no graph
        out = self.storage.append_one(self, key_states, value_states, pos, new_lens)
        if self.side is not None and not self.always_dense:
            self.side.append_one(self, key_states, value_states, pos, new_lens)
        self.seq_lens.copy_(new_lens)
        self.lengths.advance(1)
        return out

    @property
    def always_dense(self):
        """A static layer no longer than its config's ``dense_length()``: every
        decode step is dense attention (see :mod:`kvsparse.hf`), so the side
        index is never read and not kept up to date."""
        return self.is_compileable and 0 < self.capacity <= self.dense_length

    def _take_pending(self, valid):
        """The pending multi-token update, compacted: ``(k, v, counts, start,
        seen)`` with ``k``/``v`` ``[B, H, L, D]`` in the cache dtype, the valid
        tokens of each sequence first (in order), ``counts`` int32 ``[B]`` of
        them, ``start`` the lengths before the append (a copy) and ``seen``
        :meth:`tokens_seen` before it; room for ``L`` more tokens is reserved.
        None when nothing is pending."""
        if self.pending is None:  # nothing pending (e.g. a one-token update): no-op
            if not self.is_initialized:
                raise RuntimeError("kvsparse: commit() on an empty cache layer")
            return None
        k, v = self.pending
        self.pending = None
        B, H, L, D = k.shape
        seen = self.tokens_seen()
        self.lengths.reserve(self, seen + L)
        k = k.detach().to(self.dtype)
        v = v.detach().to(self.dtype)
        if valid is None:
            counts = torch.full((B,), L, dtype=torch.int32, device=self.device)
        else:
            valid = valid.to(device=self.device, dtype=torch.bool)
            if valid.shape != (B, L):
                raise ValueError(f"kvsparse: valid must be [{B}, {L}], got {tuple(valid.shape)}")
            # stable sort: the valid tokens first, in their original order
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
            gidx = order.view(B, 1, L, 1).expand(B, H, L, D)
            k = k.gather(2, gidx)
            v = v.gather(2, gidx)
            counts = valid.sum(dim=1, dtype=torch.int32)
        return k, v, counts, self.seq_lens.clone(), seen

    def commit(self, valid=None):
        """Store the pending multi-token update, compacting out invalid tokens.

        Args:
            valid: ``None`` (every token is valid) or bool ``[B, L]``, True
                for the tokens to keep (not padding).

        Returns:
            ``(start_lens, seen_before)``: int32 ``[B]`` lengths before the
            append (a copy) and the host int :meth:`tokens_seen` before it.
            Without a pending update: a no-op returning the current values.
        """
        taken = self._take_pending(valid)
        if taken is None:
            return self.seq_lens.clone(), self.tokens_seen()
        k, v, counts, start, seen = taken
        new_lens = start + counts
        self.storage.commit(self, start, new_lens, k, v, counts, seen)
        if self.side is not None and not self.always_dense:
            self.side.commit(self, start, new_lens, k, v, counts, seen)
        self.seq_lens.copy_(new_lens)
        self.lengths.advance(k.shape[2])
        return start, seen

    # ------------------------------------------------------ Cache API bits
    def reset(self):
        self.pending = None
        self.awaiting_attention = False
        if self.is_initialized:
            self.seq_lens.zero_()
            for part in self._parts():
                part.reset(self)
        self.lengths.reset()

    def _map_batch(self, fn, in_place):
        if not self.is_initialized:
            return
        if self.pending is not None:
            self.commit(None)
        if in_place:
            self.seq_lens.copy_(fn(self.seq_lens))
        else:
            self.seq_lens = fn(self.seq_lens).contiguous()
        for part in self._parts():
            part.map_batch(fn, in_place)
        self.batch_size = self.seq_lens.shape[0]

    # ------------------------------------------------------ load a sequence
    def _check_load(self, b, other):
        """Raise ``TypeError`` / ``ValueError`` naming the argument unless
        sequence 0 of ``other`` can be loaded into row ``b`` (see
        :meth:`load_sequence`); returns ``b`` as an int."""
        where = f"kvsparse: load_sequence (layer {self.layer_idx})"
        if not isinstance(other, KVCacheLayer):
            raise TypeError(f"{where}: other must be a kvsparse cache layer, got {type(other).__name__}")
        if isinstance(b, bool):
            raise TypeError(f"{where}: b must be an int, got {b!r}")
        try:
            b = operator.index(b)
        except TypeError:
            raise TypeError(f"{where}: b must be an int, got {type(b).__name__}") from None
        if not self.is_initialized:
            raise ValueError(
                f"{where}: this cache is not initialised; make it with its batch size, "
                "e.g. kvsparse.make_cache(model, batch_size=B, max_cache_len=N)")
        if not 0 <= b < self.batch_size:
            raise ValueError(f"{where}: b must be in [0, {self.batch_size}), got {b}")
        if not other.is_initialized:
            raise ValueError(f"{where}: other is not initialised (prefill it first)")
        if other.batch_size != 1:
            raise ValueError(f"{where}: other must hold one sequence (batch size 1), got batch size {other.batch_size}")
        for who, layer in (("this cache", self), ("other", other)):
            if layer.pending is not None:
                raise ValueError(
                    f"{where}: {who} holds a prefill that the kvsparse attention never committed "
                    "(run the forward with the patched model)")
        if other.config.method != self.config.method:
            raise ValueError(f"{where}: other is a {other.config.method!r} cache, this one {self.config.method!r}")
        mine, theirs = _config_fields(self.config), _config_fields(other.config)
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"{where}: other's config differs in {', '.join(diff)}")
        if other.layer_idx != self.layer_idx:
            raise ValueError(f"{where}: other is layer {other.layer_idx}")
        if other.is_compileable != self.is_compileable:
            kinds = {True: "static", False: "dynamic"}
            raise ValueError(
                f"{where}: other is a {kinds[other.is_compileable]} cache, this one "
                f"{kinds[self.is_compileable]}; load a static cache into a static one (same max_cache_len), "
                "a dynamic one into a dynamic one")
        if self.is_compileable and other.lengths.max_cache_len != self.lengths.max_cache_len:
            raise ValueError(
                f"{where}: other's max_cache_len is {other.lengths.max_cache_len}, "
                f"this cache's {self.lengths.max_cache_len}")
        if (other.num_heads, other.head_dim) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"{where}: other has {other.num_heads} KV heads of dim {other.head_dim}, "
                f"this cache {self.num_heads} of dim {self.head_dim}")
        if other.dtype != self.dtype:
            raise TypeError(f"{where}: other's dtype is {other.dtype}, this cache's {self.dtype}")
        return b

    def load_sequence(self, b, other):
        """Make sequence ``b`` of this layer a copy of sequence 0 of ``other``
        (a layer of the same method and config holding one sequence), in
        place: ``seq_lens[b]``, every part's per-sequence data
        (:meth:`kvsparse.parts.Part.load_sequence`) and the token-column
        count (the larger of both). A static layer keeps its tensors'
        addresses; a dynamic one first grows to ``other``'s capacity. See
        :meth:`KVSparseCache.load_sequence`."""
        b = self._check_load(b, other)
        if not self.is_compileable:
            self.lengths.reserve(self, other.capacity)
        self.seq_lens[b].copy_(other.seq_lens[0])
        for mine, theirs in zip(self._parts(), other._parts()):
            mine.load_sequence(self, b, theirs, other)
        self.lengths.load_sequence(other.lengths)

    def reorder_cache(self, beam_idx):
        idx = beam_idx.to(self.device) if self.is_initialized else beam_idx
        self._map_batch(lambda t: t.index_select(0, idx), in_place=self.is_compileable)

    def batch_repeat_interleave(self, repeats):
        if self.is_compileable:
            raise NotImplementedError("kvsparse: a static cache cannot change its batch size")
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0), in_place=False)

    def batch_select_indices(self, indices):
        if self.is_compileable:
            raise NotImplementedError("kvsparse: a static cache cannot change its batch size")
        self._map_batch(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices], in_place=False)

    def crop(self, tokens_to_remove):
        raise NotImplementedError("kvsparse: the kvsparse caches cannot be cropped (tokens are stored compacted)")

    def offload(self):
        raise NotImplementedError("kvsparse: cache offloading is not supported")

    def prefetch(self):
        raise NotImplementedError("kvsparse: cache offloading is not supported")


_MISSING = object()


def _config_fields(config):
    """A config's fields but ``max_cache_len`` (a cache's own may override it)."""
    fields = config.to_dict()
    fields.pop("max_cache_len", None)
    return fields


def _native_layers(layers, geometry, max_cache_len, native_layers):
    """Replace ``layers[i]`` for ``i`` in ``native_layers`` (default: the
    sliding layers of ``geometry``) by transformers' own cache layer;
    returns the indices as a frozenset."""
    if native_layers is None:
        native_layers = geometry.sliding_layers if geometry is not None else ()
    native = frozenset(int(i) for i in native_layers)
    if not native:
        return native
    if geometry is None:
        raise ValueError("kvsparse: native_layers needs the model_config")
    bad = sorted(i for i in native if not 0 <= i < len(layers))
    if bad:
        raise ValueError(f"kvsparse: native_layers {bad} out of range for {len(layers)} layers")
    hf_layers = _compat.transformers_cache_layers(geometry.model_config, max_cache_len)
    for i in native:
        layers[i] = hf_layers[i]
    return native


class KVSparseCache(Cache):
    """A transformers ``Cache`` with one kvsparse layer per decoder layer, of
    the method that the config names (a method's own cache class,
    :func:`cache_class`, is a subclass:
    :class:`QuestCache` for a :class:`~kvsparse.config.QuestConfig`,
    :class:`SparQCache`, :class:`QAQCache`).

    Args:
        num_layers: number of decoder layers (or pass ``model_config`` or
            ``geometry``).
        config: the method config (page size, chunk size, default
            ``max_cache_len``); a method's cache class defaults to its
            method's default config.
        max_cache_len: overrides ``config.max_cache_len``; an int makes every
            layer static (preallocated, compileable).
        model_config: a transformers config to take ``num_layers`` from
            (and the sliding-window layers of a hybrid model, see
            :func:`~kvsparse.geometry.sliding_layers`).
        native_layers: indices of the layers held by transformers' own cache
            layer (the one ``DynamicCache`` / ``StaticCache`` would give them)
            instead of a kvsparse layer; the patched attention runs the
            model's original attention on them. Default: the
            :func:`~kvsparse.geometry.sliding_layers` of ``model_config``
            (none without it). Needs ``model_config`` (or ``geometry``).
        geometry: the model as :func:`kvsparse.geometry.read_model` read it
            (a :class:`~kvsparse.geometry.ModelGeometry`), instead of
            ``model_config``; :meth:`allocate` places each layer on its
            attention's device from it.

    ``native_layers`` (a frozenset) says which layers those are;
    ``geometry`` is the :class:`~kvsparse.geometry.ModelGeometry` the cache
    was made for (``None`` when made from ``num_layers`` alone).
    """

    #: the method name of a method's cache class (``QuestCache``: ``"quest"``)
    method = None

    def __init__(self, num_layers=None, config=None, max_cache_len=None, model_config=None, native_layers=None,
                 geometry=None):
        if config is None:
            if self.method is None:
                raise TypeError("kvsparse: KVSparseCache needs a method config")
            config = methods.get(self.method).config_class()
        if not isinstance(config, MethodConfig) or self.method not in (None, config.method):
            raise TypeError(f"kvsparse: {type(self).__name__} cannot hold a {type(config).__name__}")
        if geometry is None and model_config is not None:
            geometry = ModelGeometry.from_config(model_config)
        if num_layers is None:
            if geometry is None:
                raise ValueError(f"kvsparse: {type(self).__name__} needs num_layers or model_config")
            num_layers = geometry.num_layers
        if max_cache_len is None:
            max_cache_len = config.max_cache_len
        self.config = config
        self.geometry = geometry
        layer = layer_class(config.method, static=max_cache_len is not None)
        layers = [layer(config, max_cache_len, i) for i in range(num_layers)]
        self.native_layers = _native_layers(layers, geometry, max_cache_len, native_layers)
        super().__init__(layers=layers)

    def allocate(self, batch_size, dtype=None, device=None):
        """Allocate every layer's buffers now, for ``batch_size`` sequences
        (otherwise they are allocated at the first forward), in ``dtype``
        (default: the model's) on ``device`` (default: each layer on its
        attention's device, a model split with ``device_map`` included; a
        layer whose device cannot be told is left to its first update).
        Needs the cache's :attr:`geometry` read from a model
        (:func:`kvsparse.make_cache` gives it)."""
        g = self.geometry
        if g is None or g.dtype is None:
            raise ValueError(f"kvsparse: {type(self).__name__}.allocate needs the geometry read from a model "
                             "(make the cache with kvsparse.make_cache(model, batch_size=...))")
        for i, layer in enumerate(self.layers):
            dev = torch.device(device) if device is not None else g.layer_device(i)
            if dev is None or dev.type == "meta":
                continue
            fake = torch.zeros(int(batch_size), g.num_kv_heads, 0, g.head_dim, dtype=dtype or g.dtype, device=dev)
            _compat.lazy_initialization(layer, fake, fake)

    def kvsparse_layers(self):
        """``(index, layer)`` of the layers that are kvsparse layers (not
        :attr:`native_layers`)."""
        return [(i, layer) for i, layer in enumerate(self.layers) if i not in self.native_layers]

    def load_sequence(self, b, other):
        """Copy the one sequence of ``other`` into row ``b`` of this cache, in
        place: to prefill a batch sequence by sequence (one prompt's dense
        prefill at a time, then decode the batch).

        Args:
            b: the row (``0 <= b < batch size``).
            other: a kvsparse cache of the same method and config (its
                ``max_cache_len`` aside) with batch size 1 and the same
                number of layers, every layer initialised (prefilled by the
                patched model); static with the same ``max_cache_len`` when
                this cache is static, dynamic when it is dynamic.

        This cache must be initialised with its batch size
        (``kvsparse.make_cache(model, batch_size=B, max_cache_len=N)``). Each
        layer copies ``seq_lens`` and every per-sequence tensor of its parts;
        the token-column count (``get_seq_length()``) becomes the larger of
        both, as after a left-padded batch prefill. A static cache keeps its
        tensors' addresses (a compiled decode step stays valid); a dynamic one
        grows to ``other``'s capacity. State a method shares across the batch
        is made to agree: QAQ's importance window is rotated into this cache's
        ring position; its re-quantization schedule (every ``requant_every``
        decode steps) is this cache's, so a sequence decodes as it would alone
        when both caches are at the same point of it (e.g. both fresh after
        their prefill, or after ``reset()``).

        Raises:
            TypeError: ``other`` is not a kvsparse cache, ``b`` is not an int,
                or the dtypes differ.
            ValueError: ``b`` out of range, ``other``'s batch size is not 1,
                different method, config, number of layers, kind (static /
                dynamic), ``max_cache_len`` or geometry, a layer not
                initialised, or a prefill never committed by the kvsparse
                attention (in either cache). Nothing is changed then.
            NotImplementedError: either cache has layers held by transformers'
                own cache layers (``native_layers``: the sliding-window layers
                of Gemma 3), whose single shared position cannot hold
                sequences of different lengths.
        """
        if not isinstance(other, KVSparseCache):
            raise TypeError(f"kvsparse: load_sequence: other must be a kvsparse cache, got {type(other).__name__}")
        if other.config.method != self.config.method:
            raise ValueError(
                f"kvsparse: load_sequence: other is a {other.config.method!r} cache, this one {self.config.method!r}")
        if len(other.layers) != len(self.layers):
            raise ValueError(
                f"kvsparse: load_sequence: other has {len(other.layers)} layers, this cache {len(self.layers)}")
        native = sorted(self.native_layers | other.native_layers)
        if native:
            raise NotImplementedError(
                f"kvsparse: load_sequence: layers {native} are transformers' own cache layers "
                "(cache.native_layers, e.g. Gemma 3's sliding-window layers): their one shared position "
                "cannot hold sequences of different lengths")
        pairs = [(mine, other.layers[i]) for i, mine in self.kvsparse_layers()]
        for mine, theirs in pairs:  # every check first: nothing changes on bad input
            mine._check_load(b, theirs)
        for mine, theirs in pairs:
            mine.load_sequence(b, theirs)

    @staticmethod
    def for_config(config, **kwargs):
        """The cache class of ``config``'s method, instantiated."""
        if not isinstance(config, MethodConfig) or config.method not in methods.names():
            raise TypeError(f"kvsparse: no cache for a {type(config).__name__}")
        return cache_class(config.method)(config=config, **kwargs)

    def __repr__(self):
        kind = "static" if self.is_compileable else "dynamic"
        return f"{type(self).__name__}({kind}, layers={len(self.layers)}, config={self.config!r})"


#: the transformers classes of one method (see :func:`method_classes`)
MethodClasses = namedtuple("MethodClasses", "layer dynamic_layer static_layer cache")
_CLASSES = {}


def method_classes(method):
    """The transformers classes of ``method`` (a registered
    :class:`~kvsparse.methods.base.Method`, or its name), made once:

    * ``<Title>CacheLayer``: a :class:`KVCacheLayer` of the method;
    * ``<Title>DynamicLayer`` / ``<Title>StaticLayer``: its subclasses, the
      class of a dynamic / static layer (for ``isinstance``);
    * ``<Title>Cache``: a :class:`KVSparseCache` of those layers, with the
      method's ``cache_methods``.
    """
    method = methods.get(method) if isinstance(method, str) else method
    if method.name not in _CLASSES:
        t = method.title

        def make(name, bases, doc, **attrs):
            return type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc, **attrs})

        layer = make(f"{t}CacheLayer", (KVCacheLayer,), f"A {t} cache layer (a :class:`KVCacheLayer`).")
        dynamic = make(f"{t}DynamicLayer", (layer,), f"A {t} cache layer whose buffers grow in chunks.")
        static = make(f"{t}StaticLayer", (layer,),
                      f"A {t} cache layer preallocated at ``max_cache_len`` tokens (compileable).")
        mixins = () if method.cache_methods is None else (method.cache_methods,)
        cache = make(f"{t}Cache", mixins + (KVSparseCache,), f"A :class:`KVSparseCache` of {t} layers.",
                     method=method.name)
        _CLASSES[method.name] = MethodClasses(layer, dynamic, static, cache)
    return _CLASSES[method.name]


def cache_class(method):
    """The transformers ``Cache`` class of ``method`` (a registered
    :class:`~kvsparse.methods.base.Method` or its name): ``<Title>Cache``."""
    return method_classes(method).cache


def layer_class(method, static):
    """The class of the dynamic or ``static`` cache layers of ``method`` (a
    registered :class:`~kvsparse.methods.base.Method` or its name)."""
    classes = method_classes(method)
    return classes.static_layer if static else classes.dynamic_layer


# the built-in methods' classes, under the names they have always had
QuestCacheLayer, QuestDynamicLayer, QuestStaticLayer, QuestCache = method_classes("quest")
SparQCacheLayer, SparQDynamicLayer, SparQStaticLayer, SparQCache = method_classes("sparq")
QAQCacheLayer, QAQDynamicLayer, QAQStaticLayer, QAQCache = method_classes("qaq")
