r"""Hugging Face ``Cache`` classes holding the KV cache in the layout of the kvsparse ops.

Each layer keeps

* ``keys`` / ``values``: ``[B, Hkv, capacity, D]`` buffers, contiguous;
* ``seq_lens``: int32 ``[B]`` on the device, the number of valid tokens of
  each sequence; sequence ``b`` occupies slots ``[0, seq_lens[b])``;
* the method's side data, updated incrementally on each append:

  - Quest (:class:`QuestCacheLayer`): ``kmin`` / ``kmax``
    ``[B, Hkv, ceil(capacity / P), D]``, the page metadata (only the touched
    pages are updated);
  - SparQ (:class:`SparQCacheLayer`): ``kt`` ``[B, Hkv, D, capacity]``, a
    channel-major copy of the keys (the new tokens' columns written in place),
    and ``v_mean`` float32 ``[B, Hkv, D]``, the running mean of the valid
    values (updated from the new tokens only, never recomputed from the cache).

Left padding: at prefill the tokens of each sequence that are not padding are
stored compacted at the front of its buffer (the keys already carry their
rotary position, and attention does not depend on the order of the keys), so
padding is never attended afterwards and ``seq_lens[b]`` counts real tokens.
Decode appends each sequence's new token at slot ``seq_lens[b]`` (a scatter
with tensor indices: no host synchronisation) and increments ``seq_lens``.

QAQ (:class:`QAQCacheLayer`) keeps no ``keys`` / ``values`` buffers at all:
both live in :class:`kvsparse.qaq.QuantStore`\ s (per-token bit-widths,
packed codes), with the importance window and the key query bound as side
state; see the class docstring.

Two layer kinds per method:

* ``*DynamicLayer`` (``max_cache_len=None``): buffers grow in chunks
  of ``chunk_size`` tokens, by an eighth of the capacity (at least a chunk)
  when full; never a per-token concatenation of the whole cache.
* ``*StaticLayer`` (``max_cache_len=N``): buffers allocated once
  (static shapes and addresses, ``is_compileable = True``), as transformers'
  ``StaticLayer``; the decode step can run under ``torch.compile``.

Prefill protocol (with the patched attention of :mod:`kvsparse.hf`): for a
multi-token update the layer only records the new key/value states
(``pending``) and returns them unchanged, so that the model's dense attention
runs on exactly what it would have seen without the patch; the attention
function then calls :meth:`KVCacheLayer.commit` with the per-token
validity read from the attention mask, which compacts the tokens into the
buffers and updates the metadata. A pending prefill that was never committed
is committed as "all tokens valid" by the next update.

Use this cache only with a model patched by :func:`kvsparse.patch`: its
decode ``update`` returns the whole buffers, whose valid part is described by
``seq_lens`` rather than by the attention mask.
"""
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _compat, methods, qaq, quest
from .config import MethodConfig, QAQConfig, QuestConfig, SparQConfig

__all__ = [
    "KVCacheLayer", "QuestCacheLayer", "QuestDynamicLayer", "QuestStaticLayer",
    "SparQCacheLayer", "SparQDynamicLayer", "SparQStaticLayer",
    "QAQCacheLayer", "QAQDynamicLayer", "QAQStaticLayer",
    "KVSparseCache", "QuestCache", "SparQCache", "QAQCache", "cache_geometry", "sliding_layers",
]


def _round_up(x, m):
    return (x + m - 1) // m * m


def _is_compiling():
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


class KVCacheLayer(CacheLayerMixin):
    """Shared logic of the kvsparse cache layers (see the module docstring).

    A method's layer adds its side data through four hooks:
    :meth:`_side_allocate` (buffers at a new capacity, keeping the content),
    :meth:`_side_append_one` (one decode token per sequence, written at
    ``pos``), :meth:`_side_commit` (a compacted multi-token append) and
    :meth:`_side_tensors` (names of the per-sequence tensors)."""

    is_sliding = False
    is_croppable = False
    is_compileable = False
    #: the name of the method whose layer this is
    method = None

    def __init__(self, page_size=16, chunk_size=256, **kwargs):
        super().__init__()
        if page_size < 1:
            raise ValueError(f"kvsparse: page_size must be >= 1, got {page_size}")
        self.page_size = int(page_size)
        self.chunk_size = _round_up(max(int(chunk_size), 1), self.page_size)
        self.capacity = 0
        self.seq_lens = None
        self.pending = None
        #: decode steps over at most this many tokens are dense (set by the cache from its config)
        self.dense_length = 0
        #: a decode token was appended and the kvsparse attention has not yet
        #: read it (checked outside torch.compile: see :meth:`update`)
        self.awaiting_attention = False
        #: number of buffer (re)allocations, for tests and diagnostics
        self.num_allocations = 0

    def __repr__(self):
        return f"{type(self).__name__}(page_size={self.page_size}, capacity={self.capacity})"

    # ----------------------------------------------------------------- setup
    def lazy_initialization(self, key_states, value_states=None):
        if value_states is None:  # transformers 4.57 passes the keys alone
            value_states = key_states
        if key_states.shape[-1] != value_states.shape[-1]:
            raise ValueError(
                "kvsparse: keys and values must have the same head dim, got "
                f"{key_states.shape[-1]} and {value_states.shape[-1]}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.head_dim = key_states.shape[-1]
        self.seq_lens = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def _allocate(self, capacity):
        """(Re)allocate the buffers at ``capacity`` tokens, keeping the content."""
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        keys = torch.zeros((B, H, capacity, D), dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        if self.capacity > 0:
            old_cap = self.capacity
            keys[:, :, :old_cap].copy_(self.keys)
            values[:, :, :old_cap].copy_(self.values)
        self.keys, self.values = keys, values
        self._side_allocate(capacity)
        self.capacity = capacity
        self.num_allocations += 1

    # ------------------------------------------------------ method side data
    def _side_allocate(self, capacity):
        """Allocate the side data for ``capacity`` tokens (``self.capacity`` is
        still the old capacity; keep the old content)."""

    def _side_append_one(self, key_states, value_states, pos, new_lens):
        """Decode: one token per sequence was written at slot ``pos`` (int64
        ``[B]``); ``self.seq_lens`` is still the old length, ``new_lens`` the new."""

    def _side_commit(self, start, new_lens, k, v, counts):
        """A multi-token append: sequence ``b`` got ``counts[b]`` tokens at
        slots ``[start[b], new_lens[b])``; ``k`` / ``v`` ``[B, H, L, D]`` hold
        them compacted (the first ``counts[b]`` valid)."""

    def _side_tensors(self):
        return ()

    # ---------------------------------------------------------------- lengths
    def tokens_seen(self):
        """Host int: token columns processed so far, padding included (an upper
        bound of ``seq_lens``). May synchronise (static layers)."""
        raise NotImplementedError

    def _advance(self, n):
        raise NotImplementedError

    def _reserve(self, needed):
        """Make room for ``needed`` tokens per sequence (host-side decision)."""
        raise NotImplementedError

    def _reserve_decode(self):
        """Make room for one more token per sequence, without synchronising."""
        raise NotImplementedError

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
            if not _is_compiling():
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
        self._reserve_decode()
        B, H, _, D = key_states.shape
        pos = self.seq_lens.to(torch.int64)
        if self.is_compileable:
            # never write out of bounds (a full static cache overwrites its last slot)
            pos = pos.clamp(max=self.capacity - 1)
        # In place, only the new token's slots: an ``index_put_`` with one index
        # per batch and head row, which torch.compile keeps in place on the
        # static buffers (a ``scatter_`` there became a copy of the whole
        # buffer every step). The cache is inference-only: no autograd history.
        rows = self._rows(pos)
        self.keys.index_put_(rows, key_states.detach()[:, :, 0].to(self.dtype))
        self.values.index_put_(rows, value_states.detach()[:, :, 0].to(self.dtype))
        new_lens = self.seq_lens + 1
        if self.is_compileable:
            new_lens = new_lens.clamp(max=self.capacity)
        if not self.always_dense:
            self._side_append_one(key_states, value_states, pos, new_lens)
        self.seq_lens.copy_(new_lens)
        self._advance(1)
        return self.keys, self.values

    @property
    def always_dense(self):
        """A static layer no longer than its config's ``dense_length()``: every
        decode step is dense attention (see :mod:`kvsparse.hf`), so the side
        data is never read and not kept up to date."""
        return self.is_compileable and 0 < self.capacity <= self.dense_length

    def _rows(self, pos):
        """Advanced-index tuple ``(b, h, pos[b])`` addressing slot ``pos[b]``
        of every ``[B, H]`` row (broadcast to ``[B, H]``)."""
        B, H = self.batch_size, self.num_heads
        b = torch.arange(B, device=self.device).view(B, 1)
        h = torch.arange(H, device=self.device).view(1, H)
        return b, h, pos.view(B, 1)

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
        self._reserve(seen + L)
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
        B, H, L, D = k.shape
        if seen == 0:
            self.keys[:, :, :L].copy_(k)
            self.values[:, :, :L].copy_(v)
        else:
            # slots start[b] .. start[b] + L - 1 (<= seen + L - 1 < capacity);
            # those past start[b] + counts[b] hold padding, beyond seq_lens
            pos = start.to(torch.int64).view(B, 1) + torch.arange(L, device=self.device)
            sidx = pos.view(B, 1, L, 1).expand(B, H, L, D)
            self.keys.scatter_(2, sidx, k)
            self.values.scatter_(2, sidx, v)
        new_lens = start + counts
        if not self.always_dense:
            self._side_commit(start, new_lens, k, v, counts)
        self.seq_lens.copy_(new_lens)
        self._advance(L)
        return start, seen

    # ------------------------------------------------------ Cache API bits
    def get_seq_length(self):
        raise NotImplementedError

    def reset(self):
        self.pending = None
        self.awaiting_attention = False
        if self.is_initialized:
            self.seq_lens.zero_()
            if self.capacity > 0:
                self.keys.zero_()
                self.values.zero_()
                for name in self._side_tensors():
                    getattr(self, name).zero_()

    def _batch_tensors(self):
        return ("keys", "values", "seq_lens") + tuple(self._side_tensors())

    def _map_batch(self, fn, in_place):
        if not self.is_initialized:
            return
        if self.pending is not None:
            self.commit(None)
        for name in self._batch_tensors():
            t = getattr(self, name)
            if t is None:
                continue
            new = fn(t)
            if in_place:
                t.copy_(new)
            else:
                setattr(self, name, new.contiguous())
        self.batch_size = self.seq_lens.shape[0]

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


class QuestCacheLayer(KVCacheLayer):
    """Quest side data: per-page channel-wise key min / max."""

    method = "quest"

    def __init__(self, page_size=16, chunk_size=256, **kwargs):
        super().__init__(page_size=page_size, chunk_size=chunk_size, **kwargs)
        self.kmin = None
        self.kmax = None

    @property
    def num_pages(self):
        return 0 if self.kmin is None else self.kmin.shape[2]

    def _side_allocate(self, capacity):
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        pages = -(-capacity // self.page_size)
        kmin = torch.zeros((B, H, pages, D), dtype=self.dtype, device=self.device)
        kmax = torch.zeros_like(kmin)
        if self.kmin is not None:
            old_pages = self.kmin.shape[2]
            kmin[:, :, :old_pages].copy_(self.kmin)
            kmax[:, :, :old_pages].copy_(self.kmax)
        self.kmin, self.kmax = kmin, kmax

    def _side_append_one(self, key_states, value_states, pos, new_lens):
        quest.update_metadata(self.keys, self.kmin, self.kmax, self.seq_lens, new_lens, self.page_size)

    def _side_commit(self, start, new_lens, k, v, counts):
        quest.update_metadata(self.keys, self.kmin, self.kmax, start, new_lens, self.page_size)

    def _side_tensors(self):
        return ("kmin", "kmax")


class SparQCacheLayer(KVCacheLayer):
    """SparQ side data: the channel-major key copy ``kt`` and the running value
    mean ``v_mean`` (float32)."""

    method = "sparq"

    def __init__(self, page_size=16, chunk_size=256, **kwargs):
        super().__init__(page_size=page_size, chunk_size=chunk_size, **kwargs)
        self.kt = None
        self.v_mean = None

    def _side_allocate(self, capacity):
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        kt = torch.zeros((B, H, D, capacity), dtype=self.dtype, device=self.device)
        if self.kt is not None:
            kt[..., : self.kt.shape[-1]].copy_(self.kt)
        self.kt = kt
        if self.v_mean is None:
            self.v_mean = torch.zeros((B, H, D), dtype=torch.float32, device=self.device)

    def _side_append_one(self, key_states, value_states, pos, new_lens):
        B, H, _, D = key_states.shape
        col = key_states.detach().to(self.dtype)
        if _is_compiling():
            # column pos[b] of every [D, capacity] slab, as an index_put_ that
            # the compiled step keeps in place (see _append_one)
            b, h, p = self._rows(pos)
            d = torch.arange(D, device=self.device).view(1, 1, D)
            self.kt.index_put_((b.view(B, 1, 1), h.view(1, H, 1), d, p.view(B, 1, 1)), col[:, :, 0])
        else:  # eager: a scatter_ is in place and one light kernel
            self.kt.scatter_(3, pos.view(B, 1, 1, 1).expand(B, H, D, 1), col.transpose(2, 3))
        # running mean over the valid tokens: m += (v - m) / n; a sequence whose
        # length did not grow (a full static cache) keeps its mean
        grown = (new_lens > self.seq_lens).view(B, 1, 1)
        n = new_lens.clamp(min=1).to(torch.float32).view(B, 1, 1)
        upd = (value_states.detach()[:, :, 0].float() - self.v_mean) / n
        self.v_mean.add_(torch.where(grown, upd, torch.zeros_like(upd)))

    def _side_commit(self, start, new_lens, k, v, counts):
        B, H, L, D = k.shape
        pos = (start.to(torch.int64).view(B, 1) + torch.arange(L, device=self.device)).clamp(max=self.capacity - 1)
        valid = torch.arange(L, device=self.device).view(1, L) < counts.view(B, 1)  # [B, L]
        # columns past counts[b] would land on slots beyond seq_lens (or be
        # clamped onto the last slot): write only the valid ones
        cur = self.kt.gather(3, pos.view(B, 1, 1, L).expand(B, H, D, L))
        newc = torch.where(valid.view(B, 1, 1, L), k.transpose(2, 3), cur)
        self.kt.scatter_(3, pos.view(B, 1, 1, L).expand(B, H, D, L), newc)
        vsum = (v.float() * valid.view(B, 1, L, 1)).sum(dim=2)  # [B, H, D]
        n = new_lens.clamp(min=1).to(torch.float32).view(B, 1, 1)
        self.v_mean.mul_(start.to(torch.float32).view(B, 1, 1)).add_(vsum).div_(n)
        self.v_mean.mul_((new_lens > 0).view(B, 1, 1))

    def _side_tensors(self):
        return ("kt", "v_mean")


class _DynamicLengths:
    """Buffers that grow in chunks (by an eighth when full); the host counts tokens."""

    is_compileable = False

    def __init__(self, page_size=16, chunk_size=256, **kwargs):
        super().__init__(page_size=page_size, chunk_size=chunk_size)
        self._seen = 0

    def tokens_seen(self):
        return self._seen

    def _advance(self, n):
        self._seen += n

    def _reserve(self, needed):
        if needed <= self.capacity:
            return
        # grow by an eighth (at least a chunk): amortised copies, and at most
        # ~12% of unused slots (doubling left up to half of the buffers empty:
        # a 32k prompt grew to 64k slots at its first decode token)
        new_cap = _round_up(max(needed, self.capacity + max(self.chunk_size, self.capacity // 8)), self.chunk_size)
        self._allocate(new_cap)

    def _reserve_decode(self):
        self._reserve(self._seen + 1)

    def get_seq_length(self):
        return self._seen

    def get_mask_sizes(self, query_length):
        return self._seen + _compat.query_length(query_length), 0

    def get_max_length(self):
        return -1

    def get_max_cache_shape(self):  # the name of get_max_length up to transformers 5.12
        return self.get_max_length()

    def reset(self):
        super().reset()
        self._seen = 0


class _StaticLengths:
    """Buffers preallocated at ``max_cache_len`` tokens (compileable)."""

    is_compileable = True

    def __init__(self, max_cache_len, page_size=16, chunk_size=256, **kwargs):
        super().__init__(page_size=page_size, chunk_size=chunk_size)
        if max_cache_len is None or int(max_cache_len) < 1:
            raise ValueError(f"kvsparse: max_cache_len must be >= 1, got {max_cache_len}")
        self.max_cache_len = int(max_cache_len)
        # a tensor (as in StaticLayer): changing it must not trigger recompilation
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)

    def lazy_initialization(self, key_states, value_states=None):
        super().lazy_initialization(key_states, value_states)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self._allocate(_round_up(self.max_cache_len, self.page_size))
        if not _is_compiling():
            for name in self._batch_tensors():
                torch._dynamo.mark_static_address(getattr(self, name))
            torch._dynamo.mark_static_address(self.cumulative_length)

    def tokens_seen(self):
        return int(self.cumulative_length) if self.is_initialized else 0

    def _reserve_decode(self):
        pass  # no host check while decoding (it would synchronise); writes are clamped

    def _advance(self, n):
        self.cumulative_length.add_(n)

    def _reserve(self, needed):
        if needed > self.capacity:
            raise ValueError(
                f"kvsparse: the static cache holds {self.max_cache_len} tokens per sequence, "
                f"{needed} needed; use a larger max_cache_len"
            )

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length):
        return self.max_cache_len, 0

    def get_max_length(self):
        return self.max_cache_len

    def get_max_cache_shape(self):  # the name of get_max_length up to transformers 5.12
        return self.get_max_length()

    def reset(self):
        super().reset()
        self.cumulative_length.zero_()


class QuestDynamicLayer(_DynamicLengths, QuestCacheLayer):
    """Quest cache layer whose buffers grow in chunks (by an eighth when full)."""


class QuestStaticLayer(_StaticLengths, QuestCacheLayer):
    """Quest cache layer preallocated at ``max_cache_len`` tokens (compileable)."""


class SparQDynamicLayer(_DynamicLengths, SparQCacheLayer):
    """SparQ cache layer whose buffers grow in chunks (by an eighth when full)."""


class SparQStaticLayer(_StaticLengths, SparQCacheLayer):
    """SparQ cache layer preallocated at ``max_cache_len`` tokens (compileable)."""


class QAQCacheLayer(KVCacheLayer):
    """QAQ cache layer: keys and values live in two :class:`kvsparse.qaq.QuantStore`
    (``ks`` / ``vs``), per-token bit-widths; there are no ``keys`` / ``values``
    buffers.

    * Prefill (:meth:`commit`): the new tokens (compacted as in the other
      layers) are quantized at the largest width; :meth:`prefill_importance`
      then feeds the last ``window`` query rows' attention weights to the
      window and re-quantizes.
    * Decode: :meth:`update` quantizes the new token at the largest width at
      slot ``seq_lens[b]``; :meth:`decode_attention` runs
      :func:`kvsparse.qaq.attention` on the packed codes (no host
      synchronisation) and keeps ``p_max`` in a :class:`kvsparse.qaq.AttentionWindow`;
      every ``requant_every`` steps (a host counter) the widths are
      recomputed (:func:`kvsparse.qaq.key_bits` with the largest ``|q|^2``
      since the last re-quantization, :func:`kvsparse.qaq.value_bits` with the
      window's ``S_t``) and lowered in place (:func:`kvsparse.qaq.requantize`).
    * Layout: the dynamic layer packs the groups' codes back to back
      (``packed`` offsets: new tokens at the end of the sequence's used bytes,
      ``used_k`` / ``used_v``); lowering a width leaves a hole that
      :meth:`compact` removes (host side, synchronises: after the prefill's
      re-quantization, every ``compact_every`` re-quantizations and when the
      arena is full). The static layer keeps fixed slots of the largest width
      (never moves, never synchronises).

    :meth:`memory_report` counts the bytes in use (codes of the valid tokens,
    scales/zeros, widths, offsets, outliers) against an fp16 cache.
    """

    method = "qaq"
    packed = True

    def __init__(self, page_size=1, chunk_size=256, **kwargs):
        super().__init__(page_size=1, chunk_size=chunk_size, **kwargs)
        self.cfg = QAQConfig()
        self.layer_idx = 0
        self.ks = self.vs = None
        self.window = None
        self.q_sq = None
        self.used_k = self.used_v = None
        self._bound = {"ks": 0, "vs": 0}
        self._steps = 0
        self._dsteps = None  # the static layer's step counter (a device tensor)
        self._requants = 0
        #: number of compactions, for tests and diagnostics
        self.num_compactions = 0

    def setup(self, config, layer_idx):
        """Attach the method config and the layer's index (called by :class:`QAQCache`)."""
        self.cfg = config
        self.layer_idx = int(layer_idx)
        return self

    def __repr__(self):
        return f"{type(self).__name__}(layer={self.layer_idx}, capacity={self.capacity})"

    # ------------------------------------------------------------ geometry
    @property
    def adaptive(self):
        """Whether this layer's widths are ever lowered."""
        return self.cfg.adaptive and self.layer_idx >= self.cfg.dense_layers

    @property
    def width(self):
        """Width of newly stored tokens."""
        return self.cfg.max_width

    @property
    def groups(self):
        return 1 if self.cfg.shared else self.num_heads

    @property
    def group_elems(self):
        return self.head_dim * self.num_heads // self.groups

    def _token_bytes(self):
        """Code bytes of one token (all its groups) at the largest width."""
        return self.groups * self.group_elems * self.width // 8

    def lazy_initialization(self, key_states, value_states=None):
        super().lazy_initialization(key_states, value_states)
        self.model_dtype = key_states.dtype
        self.dtype = self.cfg.store_dtype(key_states.dtype)
        B = self.batch_size
        self.used_k = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.used_v = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.q_sq = torch.zeros(B, self.groups, dtype=torch.float32, device=self.device)
        self._dsteps = torch.zeros((), dtype=torch.int64, device=self.device)

    def _new_store(self, name, capacity, arena_bytes):
        alpha = self.cfg.alpha if name == "ks" else self.cfg.value_alpha
        return qaq.alloc(self.batch_size, self.num_heads, capacity, self.head_dim, self.dtype, self.device,
                         alpha=alpha, shared=self.cfg.shared, arena_bytes=max(int(arena_bytes), 1))

    def _allocate(self, capacity):
        """(Re)allocate the per-token tensors at ``capacity`` tokens, keeping the content."""
        old = self.capacity
        names = ("offsets", "widths", "sz", "oidx", "oval")
        for name in ("ks", "vs"):
            st = getattr(self, name)
            if self.packed:
                arena_bytes = capacity * self._token_bytes() if st is None else st.arena.shape[1]
            else:  # fixed slots of the largest width
                arena_bytes = capacity * self._token_bytes()
            new = self._new_store(name, capacity, arena_bytes)
            if not self.packed:
                new.offsets.copy_(qaq.slot_offsets(new, self.width))
            if st is not None:
                for n in names:
                    getattr(new, n)[:, :, :old].copy_(getattr(st, n))
                new = new._replace(arena=st.arena) if self.packed else new
                if not self.packed:
                    new.arena[:, : st.arena.shape[1]].copy_(st.arena)
            setattr(self, name, new)
        win = qaq.AttentionWindow(self.batch_size, self.num_heads, capacity, n=self.cfg.window, device=self.device)
        if self.window is not None:
            win.hist[..., :old].copy_(self.window.hist)
            win.step.copy_(self.window.step)
        self.window = win
        self.capacity = capacity
        self.num_allocations += 1

    # ---------------------------------------------------------- packed arena
    def _ensure_arena(self, extra):
        """Room for ``extra`` more code bytes per sequence in both arenas (host
        bound, no synchronisation unless a compaction is needed)."""
        if not self.packed:
            return
        for name in ("ks", "vs"):
            st = getattr(self, name)
            if self._bound[name] + extra <= st.arena.shape[1]:
                continue
            if self._requants > 0:
                self.compact()
                st = getattr(self, name)
                if self._bound[name] + extra <= st.arena.shape[1]:
                    continue
            need = self._bound[name] + extra
            A = max(2 * st.arena.shape[1], need + self.chunk_size * self._token_bytes())
            arena = torch.zeros(self.batch_size, A, dtype=torch.uint8, device=self.device)
            arena[:, : st.arena.shape[1]].copy_(st.arena)
            setattr(self, name, st._replace(arena=arena))

    def _packed_offsets(self, used, n, counts=None):
        """int32 ``[B, Hg, n]`` offsets for ``n`` new tokens per sequence placed
        after ``used`` bytes (token-major, then group); advances ``used`` by the
        bytes of the ``counts`` valid ones (default all ``n``)."""
        B, Hg = self.batch_size, self.groups
        per = self.group_elems * self.width // 8
        i = torch.arange(n, device=self.device).view(1, 1, n)
        g = torch.arange(Hg, device=self.device).view(1, Hg, 1)
        offs = used.view(B, 1, 1) + (i * Hg + g) * per
        used.add_((n if counts is None else counts.to(torch.int64)) * Hg * per)
        return offs.to(torch.int32)

    def compact(self):
        """Re-pack both stores back to back (:func:`kvsparse.qaq.compact`),
        leaving ``chunk_size`` tokens of headroom; host side (synchronises).
        No-op on the static layer."""
        if not self.packed or self.ks is None:
            return
        for name, used in (("ks", self.used_k), ("vs", self.used_v)):
            c = qaq.compact(getattr(self, name), self.seq_lens)
            _, nbytes = qaq.packed_offsets(c.widths, c.group_elems)
            bound = int(nbytes.max()) if nbytes.numel() else 0
            arena = torch.zeros(self.batch_size, bound + self.chunk_size * self._token_bytes(),
                                dtype=torch.uint8, device=self.device)
            n = min(bound, c.arena.shape[1])
            arena[:, :n].copy_(c.arena[:, :n])
            setattr(self, name, c._replace(arena=arena))
            used.copy_(nbytes)
            self._bound[name] = bound
        self._requants = 0
        self.num_compactions += 1

    # ---------------------------------------------------------------- writes
    def _quantize(self, k, v, pos, widths, counts=None):
        n = k.shape[2]
        if self.packed:
            self._ensure_arena(n * self._token_bytes())
            ok = self._packed_offsets(self.used_k, n, counts)
            ov = self._packed_offsets(self.used_v, n, counts)
            for name in ("ks", "vs"):
                self._bound[name] += n * self._token_bytes()
        else:
            ok = ov = None
        qaq.quantize(self.ks, k.contiguous(), pos.to(torch.int32), widths, ok)
        qaq.quantize(self.vs, v.contiguous(), pos.to(torch.int32), widths, ov)

    def _append_one(self, key_states, value_states):
        """Decode: quantize one token per sequence at slot ``seq_lens[b]``."""
        self._reserve_decode()
        pos = self.seq_lens
        if not self.packed:
            pos = pos.clamp(max=self.capacity - 1)  # a full static cache overwrites its last slot
        k = key_states.detach().to(self.dtype)
        v = value_states.detach().to(self.dtype)
        self._quantize(k, v, pos, self.width)
        new_lens = self.seq_lens + 1
        if not self.packed:
            new_lens = new_lens.clamp(max=self.capacity)
        self.seq_lens.copy_(new_lens)
        self._advance(1)
        return key_states, value_states

    def commit(self, valid=None):
        """As :meth:`KVCacheLayer.commit`, into the quantized stores (at the
        largest width; padding slots get width 0 and no code bytes)."""
        taken = self._take_pending(valid)
        if taken is None:
            return self.seq_lens.clone(), self.tokens_seen()
        k, v, counts, start, seen = taken
        B, H, L, D = k.shape
        ok = torch.arange(L, device=self.device).view(1, L) < counts.view(B, 1)
        widths = torch.where(ok, self.width, 0).to(torch.uint8).view(B, 1, L).expand(B, self.groups, L)
        self._quantize(k, v, start, widths.contiguous(), counts)
        self.seq_lens.copy_(start + counts)
        self._advance(L)
        return start, seen

    def dequantized(self, length=None):
        """``(keys, values)`` ``[B, Hkv, length, D]`` in the model's dtype,
        dequantized (zeros past ``seq_lens``); for a prefill continuing the cache."""
        T = self.capacity if length is None else min(int(length), self.capacity)
        k = qaq.dequantize(self.ks, self.seq_lens)[:, :, :T]
        v = qaq.dequantize(self.vs, self.seq_lens)[:, :, :T]
        return k.to(self.model_dtype), v.to(self.model_dtype)

    # ------------------------------------------------------------ importance
    @torch.no_grad()
    def prefill_importance(self, query, start, valid, seen, scaling):
        """After a committed prefill: the attention weights of the last
        ``window`` query rows (over the stored tokens, causal, padding
        excluded) go to the window, ``|q|^2`` of the last row to the key bound,
        and the widths are re-evaluated (then the dynamic cache is compacted)."""
        if not self.adaptive:
            return
        B, H, L, D = query.shape
        Hkv, Hg = self.num_heads, self.groups
        n = min(self.cfg.window, L)
        T = min(seen + L, self.capacity)
        keys = qaq.dequantize(self.ks, self.seq_lens)[:, :, :T].float()  # [B, Hkv, T, D]
        qn = query[:, :, L - n:].detach().float()  # [B, H, n, D]
        G = H // Hkv
        s = torch.matmul(qn.reshape(B, Hkv, G * n, D), keys.transpose(-1, -2)).view(B, Hkv, G, n, T) * scaling
        if valid is None:
            upto = torch.arange(1, L + 1, device=self.device, dtype=torch.int32).expand(B, L)
        else:
            upto = valid.to(device=self.device, dtype=torch.int32).cumsum(dim=1, dtype=torch.int32)
        limit = (start.view(B, 1) + upto[:, L - n:]).clamp(min=1)  # [B, n]
        vis = torch.arange(T, device=self.device).view(1, 1, T) < limit.view(B, n, 1)
        s = s.masked_fill(~vis.view(B, 1, 1, n, T), float("-inf"))
        p = torch.softmax(s, dim=-1).amax(dim=2)  # [B, Hkv, n, T]
        row = torch.zeros(B, Hkv, self.capacity, dtype=torch.float32, device=self.device)
        for j in range(n):
            row[..., :T].copy_(p[:, :, j])
            self.window.push(row)
        qs = qaq.query_sq(query[:, :, L - 1].detach(), Hg, scaling)
        self.q_sq = torch.maximum(self.q_sq, qs)
        self.requantize()
        self.compact()

    def decode_attention(self, q, scaling):
        """One decode step: ``q`` ``[B, H, D]`` -> ``[B, H, D]`` (q's dtype),
        attending the packed cache; feeds the window and re-quantizes every
        ``requant_every`` steps."""
        qd = q.to(self.dtype).contiguous()
        if not self.adaptive:
            return qaq.attention(qd, self.ks, self.vs, self.seq_lens, scaling).to(q.dtype)
        out, pm = qaq.attention(qd, self.ks, self.vs, self.seq_lens, scaling, return_p_max=True)
        self.window.push(pm)
        self.q_sq.copy_(torch.maximum(self.q_sq, qaq.query_sq(q.detach(), self.groups, scaling)))
        if self.is_compileable:
            # no host counter (a compiled step is replayed as a CUDA graph): the
            # widths are computed every step and applied where the device
            # counter says a re-quantization is due (elsewhere a no-op)
            if self.cfg.requant_every:
                self._dsteps.add_(1)
                due = self._dsteps >= self.cfg.requant_every
                self.requantize(due)
                self._dsteps.masked_fill_(due, 0)
            return out.to(q.dtype)
        self._steps += 1
        if self.cfg.requant_every and self._steps >= self.cfg.requant_every:
            self.requantize()
            if self.packed and self.cfg.compact_every and self._requants >= self.cfg.compact_every:
                self.compact()
        return out.to(q.dtype)

    def requantize(self, due=None):
        """Recompute the widths from the bounds and lower them in place (no sync).

        ``due``: ``None``, or a 0-dim bool device tensor: the new widths apply
        (and the ``|q|^2`` bound restarts) only where it is true (the static
        layer's schedule, with no host branch)."""
        cfg = self.cfg
        kb = qaq.key_bits(qaq.stored_range(self.ks), self.q_sq, self.seq_lens, cfg.key_sigma,
                          cfg.allowed, cfg.n_recent)
        vb = qaq.value_bits(qaq.stored_range(self.vs), self.window.s_max(self.vs.groups), self.seq_lens,
                            cfg.value_sigma, cfg.allowed, cfg.n_recent)
        if cfg.tile_widths > 1:
            kb = qaq.uniform_tiles(kb, self.seq_lens, cfg.tile_widths)
            vb = qaq.uniform_tiles(vb, self.seq_lens, cfg.tile_widths)
        if due is not None:
            kb = torch.where(due, kb, self.ks.widths)
            vb = torch.where(due, vb, self.vs.widths)
        qaq.requantize(self.ks, kb, self.seq_lens)
        qaq.requantize(self.vs, vb, self.seq_lens)
        if due is not None:
            self.q_sq.masked_fill_(due, 0.0)
            return
        self.q_sq.zero_()
        self._steps = 0
        self._requants += 1

    # --------------------------------------------------------------- memory
    def memory_report(self):
        """Bytes in use (keys + values) vs an fp16 cache; see :func:`kvsparse.qaq.memory_report`.

        Adds ``allocated`` (every buffer this layer holds: arenas, per-token
        tensors at capacity) and ``window`` (the importance window, float32
        working state; not in ``total``)."""
        if self.ks is None:
            return _empty_report()
        rk = qaq.memory_report(self.ks, self.seq_lens)
        rv = qaq.memory_report(self.vs, self.seq_lens)
        rep = {key: rk[key] + rv[key] for key in _REPORT_KEYS}
        rep["allocated"] = sum(t.numel() * t.element_size() for st in (self.ks, self.vs) for t in st.tensors())
        rep["window"] = self.window.hist.numel() * 4 if self.adaptive else 0
        return _finish_report(rep)

    # ------------------------------------------------------ Cache API bits
    def reset(self):
        self.pending = None
        self.awaiting_attention = False
        if self.is_initialized:
            self.seq_lens.zero_()
            if self.ks is not None:
                for name in ("ks", "vs"):
                    st = getattr(self, name)
                    st.widths.zero_()
                    st.oidx.fill_(-1)
                    if not self.packed:
                        st.offsets.copy_(qaq.slot_offsets(st, self.width))
                self.window.hist.zero_()
                self.window.step.zero_()
            self.used_k.zero_()
            self.used_v.zero_()
            self.q_sq.zero_()
            self._dsteps.zero_()
            self._bound = {"ks": 0, "vs": 0}
            self._steps = 0
            self._requants = 0

    def _map_batch(self, fn, in_place):
        if not self.is_initialized:
            return
        if self.pending is not None:
            self.commit(None)

        def apply(t):
            new = fn(t)
            if in_place:
                t.copy_(new)
                return t
            return new.contiguous()

        self.seq_lens = apply(self.seq_lens)
        self.used_k, self.used_v, self.q_sq = apply(self.used_k), apply(self.used_v), apply(self.q_sq)
        if self.ks is not None:
            for name in ("ks", "vs"):
                st = getattr(self, name)
                setattr(self, name, st._replace(**{f: apply(getattr(st, f)) for f in st._fields[:6]}))
            hist = fn(self.window.hist.transpose(0, 1)).transpose(0, 1)
            if in_place:
                self.window.hist.copy_(hist)
            else:
                self.window.hist = hist.contiguous()
        self.batch_size = self.seq_lens.shape[0]


_REPORT_KEYS = ("codes", "scale_zero", "widths", "offsets", "outliers", "total", "fp16", "arena")


def _empty_report():
    return _finish_report({**{k: 0 for k in _REPORT_KEYS}, "allocated": 0, "window": 0})


def _finish_report(rep):
    rep["ratio"] = rep["total"] / rep["fp16"] if rep["fp16"] else 0.0
    rep["compression"] = rep["fp16"] / rep["total"] if rep["total"] else 0.0
    return rep


class QAQDynamicLayer(_DynamicLengths, QAQCacheLayer):
    """QAQ cache layer, packed codes, grown in chunks and compacted (host side)."""


class QAQStaticLayer(_StaticLengths, QAQCacheLayer):
    """QAQ cache layer preallocated at ``max_cache_len`` tokens with fixed slots
    of the largest width (no compaction, no host synchronisation), compileable:
    its decode step keeps no host state (the window's ring index and the
    re-quantization period are device counters; the widths are evaluated
    every step and applied every ``requant_every``). Lowered widths cut the
    bytes attention reads; the slots keep their 8-bit room, so the memory held
    is that of an 8-bit cache plus metadata."""

    packed = False
    is_compileable = True

    def lazy_initialization(self, key_states, value_states=None):
        QAQCacheLayer.lazy_initialization(self, key_states, value_states)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self._allocate(self.max_cache_len)
        if not _is_compiling():
            for t in self._state_tensors():
                torch._dynamo.mark_static_address(t)

    def _state_tensors(self):
        """Every tensor a decode step reads or writes in place (static addresses)."""
        yield from (self.seq_lens, self.cumulative_length, self.q_sq, self._dsteps, self.used_k, self.used_v)
        for st in (self.ks, self.vs):
            yield from st.tensors()
        yield from (self.window.hist, self.window.step)


def _text_config(model_config):
    return model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config


#: ``layer_types`` entries of a windowed layer (transformers' names)
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def sliding_layers(model_config):
    """Indices of the sliding-window layers of a *hybrid* decoder config (some
    layers windowed, some full, from ``config.layer_types``: Gemma 3, Qwen2/3
    with ``use_sliding_window`` and ``max_window_layers``).

    A kvsparse cache leaves these layers to transformers' own sliding-window
    cache layer and the model's own (windowed) attention; the method runs on
    the full-attention layers. A config whose layers are all windowed, or
    that has no ``layer_types`` (Mistral with ``sliding_window``), gives
    ``()``: every layer runs the method, the window applied at prefill only
    (see :mod:`kvsparse.hf`)."""
    cfg = _text_config(model_config)
    types = getattr(cfg, "layer_types", None)
    if not types:
        return ()
    types = list(types)[: cfg.num_hidden_layers]
    windowed = tuple(i for i, t in enumerate(types) if t in WINDOWED_LAYER_TYPES)
    return () if len(windowed) == len(types) else windowed


def cache_geometry(model_config):
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder config."""
    cfg = _text_config(model_config)
    num_layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return num_layers, kv_heads, head_dim


def _native_layers(layers, model_config, max_cache_len, native_layers):
    """Replace ``layers[i]`` for ``i`` in ``native_layers`` (default: the
    sliding layers of ``model_config``) by transformers' own cache layer;
    returns the indices as a frozenset."""
    if native_layers is None:
        native_layers = sliding_layers(model_config) if model_config is not None else ()
    native = frozenset(int(i) for i in native_layers)
    if not native:
        return native
    if model_config is None:
        raise ValueError("kvsparse: native_layers needs the model_config")
    bad = sorted(i for i in native if not 0 <= i < len(layers))
    if bad:
        raise ValueError(f"kvsparse: native_layers {bad} out of range for {len(layers)} layers")
    hf_layers = _compat.transformers_cache_layers(model_config, max_cache_len)
    for i in native:
        layers[i] = hf_layers[i]
    return native


class KVSparseCache(Cache):
    """A transformers ``Cache`` with one kvsparse layer per decoder layer, of
    the kind that the method config asks for (the method's
    :meth:`~kvsparse.methods.base.Method.cache_class`: :class:`QuestCache`
    for a :class:`~kvsparse.config.QuestConfig`, :class:`SparQCache`,
    :class:`QAQCache`).

    Args:
        num_layers: number of decoder layers (or pass ``model_config``).
        config: the method config (page size, chunk size, default ``max_cache_len``).
        max_cache_len: overrides ``config.max_cache_len``; an int makes every
            layer static (preallocated, compileable).
        model_config: a transformers config to take ``num_layers`` from
            (and the sliding-window layers of a hybrid model, see
            :func:`sliding_layers`).
        native_layers: indices of the layers held by transformers' own cache
            layer (the one ``DynamicCache`` / ``StaticCache`` would give them)
            instead of a kvsparse layer; the patched attention runs the
            model's original attention on them. Default: the
            :func:`sliding_layers` of ``model_config`` (none without it).
            Needs ``model_config``.

    ``native_layers`` (a frozenset) says which layers those are.
    """

    #: (dynamic layer class, static layer class), per subclass
    layer_classes = None
    default_config = None

    def __init__(self, num_layers=None, config=None, max_cache_len=None, model_config=None, native_layers=None):
        config = self.default_config() if config is None else config
        if num_layers is None:
            if model_config is None:
                raise ValueError(f"kvsparse: {type(self).__name__} needs num_layers or model_config")
            num_layers = cache_geometry(model_config)[0]
        if max_cache_len is None:
            max_cache_len = config.max_cache_len
        self.config = config
        page_size = getattr(config, "page_size", 1)
        dyn, static = self.layer_classes
        if max_cache_len is None:
            layers = [dyn(page_size, config.chunk_size) for _ in range(num_layers)]
        else:
            layers = [static(max_cache_len, page_size, config.chunk_size) for _ in range(num_layers)]
        self.native_layers = _native_layers(layers, model_config, max_cache_len, native_layers)
        dense_length = config.dense_length()
        for layer in layers:
            if isinstance(layer, KVCacheLayer):
                layer.dense_length = dense_length
        super().__init__(layers=layers)

    def kvsparse_layers(self):
        """``(index, layer)`` of the layers that are kvsparse layers (not
        :attr:`native_layers`)."""
        return [(i, layer) for i, layer in enumerate(self.layers) if i not in self.native_layers]

    @staticmethod
    def for_config(config, **kwargs):
        """The cache class of ``config``'s method, instantiated."""
        if not isinstance(config, MethodConfig) or config.method not in methods.names():
            raise TypeError(f"kvsparse: no cache for a {type(config).__name__}")
        return methods.get(config.method).cache_class()(config=config, **kwargs)

    def __repr__(self):
        kind = "static" if self.is_compileable else "dynamic"
        return f"{type(self).__name__}({kind}, layers={len(self.layers)}, config={self.config!r})"


class QuestCache(KVSparseCache):
    """A :class:`KVSparseCache` of Quest layers (keys, values, page min/max)."""

    layer_classes = (QuestDynamicLayer, QuestStaticLayer)
    default_config = QuestConfig

    @property
    def page_size(self):
        return self.config.page_size


class SparQCache(KVSparseCache):
    """A :class:`KVSparseCache` of SparQ layers (keys, values, the channel-major
    key copy and the running value mean)."""

    layer_classes = (SparQDynamicLayer, SparQStaticLayer)
    default_config = SparQConfig


class QAQCache(KVSparseCache):
    """A :class:`KVSparseCache` of QAQ layers (per-token bit-width quantized keys
    and values; no fp16 buffers)."""

    layer_classes = (QAQDynamicLayer, QAQStaticLayer)
    default_config = QAQConfig

    def __init__(self, num_layers=None, config=None, max_cache_len=None, model_config=None, native_layers=None):
        super().__init__(num_layers=num_layers, config=config, max_cache_len=max_cache_len,
                         model_config=model_config, native_layers=native_layers)
        for i, layer in self.kvsparse_layers():
            layer.setup(self.config, i)

    def memory_report(self):
        """Sum of the layers' :meth:`QAQCacheLayer.memory_report`: true bytes
        in use (``total``: codes, scales/zeros, widths, offsets, outliers) vs
        an fp16 cache of the same tokens (``fp16``); ``compression = fp16 / total``."""
        reps = [layer.memory_report() for _, layer in self.kvsparse_layers()]
        keys = [k for k in reps[0] if k not in ("ratio", "compression")] if reps else list(_REPORT_KEYS)
        return _finish_report({k: sum(r.get(k, 0) for r in reps) for k in keys})

    def compact(self):
        """Compact every dynamic layer (host side)."""
        for _, layer in self.kvsparse_layers():
            layer.compact()
