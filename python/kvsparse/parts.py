"""The parts a kvsparse cache layer (:class:`kvsparse.cache.KVCacheLayer`) is built from.

A layer keeps the geometry (``batch_size``, ``num_heads``, ``head_dim``,
``dtype``, ``device``), the per-sequence lengths ``seq_lens`` and the
``capacity``; its data lives in its parts:

* a **storage**, where the tokens are: :class:`DenseKV` (``keys`` /
  ``values`` buffers; Quest, SparQ) or a method's own (QAQ's packed
  quantized stores, :class:`kvsparse.methods.qaq.QuantKV`);
* optionally a **side index** beside a dense storage, updated from the new
  tokens only (Quest's page bounds, :class:`kvsparse.methods.quest.QuestPages`;
  SparQ's channel-major keys and value mean, :class:`kvsparse.methods.sparq.SparQKeys`);
* a **length policy**: :class:`DynamicLengths` (buffers grown in chunks, the
  host counts tokens) or :class:`StaticLengths` (buffers allocated once at
  ``max_cache_len``, compileable).

Storages and side indexes are :class:`Part` objects: the layer calls their
hooks with itself as the first argument (its geometry and lengths). Nothing
here imports transformers.
"""
import torch

from . import _compat

__all__ = ["Part", "DenseKV", "DynamicLengths", "StaticLengths", "round_up", "is_compiling", "slot_rows", "copy_row"]


def round_up(x, m):
    return (x + m - 1) // m * m


def is_compiling():
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def slot_rows(layer, pos):
    """Advanced-index tuple ``(b, h, pos[b])`` addressing slot ``pos[b]``
    of every ``[B, H]`` row of ``layer`` (broadcast to ``[B, H]``)."""
    B, H = layer.batch_size, layer.num_heads
    b = torch.arange(B, device=layer.device).view(B, 1)
    h = torch.arange(H, device=layer.device).view(1, H)
    return b, h, pos.view(B, 1)


def copy_row(dst, b, src, dim=0, fill=0):
    """In place: row ``b`` of ``dst`` (index ``b`` along ``dim``) becomes row 0
    of ``src`` (any device). A ``src`` row smaller along some dims (a dynamic
    cache of a smaller capacity) fills the leading block of the row and the
    rest is set to ``fill``; ``src=None`` (nothing allocated) sets the whole
    row to ``fill``. ``dst`` keeps its address."""
    row = dst.select(dim, b)
    if src is None:
        row.fill_(fill)
        return
    s = src.select(dim, 0)
    if s.shape == row.shape:
        row.copy_(s)
        return
    if s.dim() != row.dim() or any(n > m for n, m in zip(s.shape, row.shape)):
        raise ValueError(f"kvsparse: cannot copy a row of shape {tuple(s.shape)} into one of shape {tuple(row.shape)}")
    row.fill_(fill)
    row[tuple(slice(0, n) for n in s.shape)].copy_(s)


class Part:
    """A storage or side index of a cache layer: it owns tensors whose first
    dim is the batch (named in :attr:`names`, ``None`` until allocated) and
    keeps them in step with the layer's tokens through the hooks below."""

    #: the attributes holding the part's per-sequence tensors
    names = ()

    def __init__(self):
        for name in self.names:
            setattr(self, name, None)

    def store_dtype(self, model_dtype):
        """A storage's: the dtype of the stored tokens (the layer's ``dtype``)
        for a model of ``model_dtype``."""
        return model_dtype

    def init(self, layer):
        """The layer's geometry is known (first update, or an explicit batch size)."""

    def allocate(self, layer, capacity):
        """(Re)allocate for ``capacity`` tokens per sequence, keeping the
        content (``layer.capacity`` is still the old capacity, 0 at first)."""

    def append_one(self, layer, key_states, value_states, pos, new_lens):
        """Decode: one token per sequence (``[B, H, 1, D]``), stored at slot
        ``pos`` (int64 ``[B]``); ``layer.seq_lens`` is still the old length,
        ``new_lens`` the new one."""

    def commit(self, layer, start, new_lens, k, v, counts, seen):
        """A multi-token append: sequence ``b`` gets ``counts[b]`` tokens at
        slots ``[start[b], new_lens[b])``; ``k`` / ``v`` ``[B, H, L, D]`` (in
        ``layer.dtype``) hold them compacted (the first ``counts[b]`` valid);
        ``seen``: token columns stored before."""

    def tensors(self):
        """Every tensor the part holds (a static layer fixes their addresses)."""
        return [t for t in (getattr(self, name) for name in self.names) if t is not None]

    def reset(self, layer):
        """Forget every token, keeping the allocation."""
        for t in self.tensors():
            t.zero_()

    def map_batch(self, fn, in_place):
        """Apply ``fn`` to the batch dim of every tensor (beam search,
        batch selection): in place (a static layer) or replacing them."""
        for name in self.names:
            t = getattr(self, name)
            if t is None:
                continue
            if in_place:
                t.copy_(fn(t))
            else:
                setattr(self, name, fn(t).contiguous())

    def load_sequence(self, layer, b, other, other_layer):
        """Make sequence ``b`` of ``layer`` a copy of sequence 0 of
        ``other_layer`` (whose part of the same kind is ``other``), in place
        (see :meth:`kvsparse.cache.KVCacheLayer.load_sequence`). The layer's
        capacity is at least ``other_layer``'s. Default: every tensor of
        :attr:`names` copied along its batch dim 0 (slots past the other's
        capacity zeroed)."""
        for name in self.names:
            t = getattr(self, name)
            if t is not None:
                copy_row(t, b, getattr(other, name))


class DenseKV(Part):
    """Storage of the tokens in ``keys`` / ``values`` ``[B, Hkv, capacity, D]``
    buffers (contiguous, the layer's dtype); sequence ``b`` occupies slots
    ``[0, seq_lens[b])``."""

    names = ("keys", "values")

    def allocate(self, layer, capacity):
        B, H, D = layer.batch_size, layer.num_heads, layer.head_dim
        keys = torch.zeros((B, H, capacity, D), dtype=layer.dtype, device=layer.device)
        values = torch.zeros_like(keys)
        if layer.capacity > 0:
            old_cap = layer.capacity
            keys[:, :, :old_cap].copy_(self.keys)
            values[:, :, :old_cap].copy_(self.values)
        self.keys, self.values = keys, values

    def append_one(self, layer, key_states, value_states, pos, new_lens):
        # In place, only the new token's slots: an ``index_put_`` with one index
        # per batch and head row, which torch.compile keeps in place on the
        # static buffers (a ``scatter_`` there became a copy of the whole
        # buffer every step). The cache is inference-only: no autograd history.
        rows = slot_rows(layer, pos)
        self.keys.index_put_(rows, key_states.detach()[:, :, 0].to(layer.dtype))
        self.values.index_put_(rows, value_states.detach()[:, :, 0].to(layer.dtype))
        return self.keys, self.values

    def commit(self, layer, start, new_lens, k, v, counts, seen):
        B, H, L, D = k.shape
        if seen == 0:
            self.keys[:, :, :L].copy_(k)
            self.values[:, :, :L].copy_(v)
            return
        # slots start[b] .. start[b] + L - 1 (<= seen + L - 1 < capacity);
        # those past start[b] + counts[b] hold padding, beyond seq_lens
        pos = start.to(torch.int64).view(B, 1) + torch.arange(L, device=layer.device)
        sidx = pos.view(B, 1, L, 1).expand(B, H, L, D)
        self.keys.scatter_(2, sidx, k)
        self.values.scatter_(2, sidx, v)


class DynamicLengths:
    """Buffers that grow in chunks of the layer's ``chunk_size`` (by an eighth
    of the capacity when full); the host counts the token columns."""

    is_compileable = False

    def __init__(self):
        self.seen = 0

    def init(self, layer):
        pass  # buffers are allocated by the first reserve

    def tensors(self):
        return []

    def tokens_seen(self, layer):
        return self.seen

    def advance(self, n):
        self.seen += n

    def reserve(self, layer, needed):
        if needed <= layer.capacity:
            return
        # grow by an eighth (at least a chunk): amortised copies, and at most
        # ~12% of unused slots (doubling left up to half of the buffers empty:
        # a 32k prompt grew to 64k slots at its first decode token)
        chunk = layer.chunk_size
        new_cap = round_up(max(needed, layer.capacity + max(chunk, layer.capacity // 8)), chunk)
        layer._allocate(new_cap)

    def reserve_decode(self, layer):
        self.reserve(layer, self.seen + 1)

    def get_seq_length(self, layer):
        return self.seen

    def get_mask_sizes(self, query_length):
        return self.seen + _compat.query_length(query_length), 0

    def get_max_length(self):
        return -1

    def reset(self):
        self.seen = 0

    def load_sequence(self, other):
        """A sequence of ``other`` (a :class:`DynamicLengths`) was loaded: the
        token columns are the larger count."""
        self.seen = max(self.seen, other.seen)


class StaticLengths:
    """Buffers preallocated at ``max_cache_len`` tokens (static shapes and
    addresses: compileable); the token columns are counted on the device."""

    is_compileable = True

    def __init__(self, max_cache_len):
        if max_cache_len is None or int(max_cache_len) < 1:
            raise ValueError(f"kvsparse: max_cache_len must be >= 1, got {max_cache_len}")
        self.max_cache_len = int(max_cache_len)
        # a tensor (as in transformers' StaticLayer): changing it must not trigger recompilation
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)

    def init(self, layer):
        self.cumulative_length = self.cumulative_length.to(layer.device)
        layer._allocate(round_up(self.max_cache_len, layer.page_size))
        if not is_compiling():
            for t in layer.state_tensors():
                torch._dynamo.mark_static_address(t)

    def tensors(self):
        return [self.cumulative_length]

    def tokens_seen(self, layer):
        return int(self.cumulative_length) if layer.is_initialized else 0

    def advance(self, n):
        self.cumulative_length.add_(n)

    def reserve(self, layer, needed):
        if needed > layer.capacity:
            raise ValueError(
                f"kvsparse: the static cache holds {self.max_cache_len} tokens per sequence, "
                f"{needed} needed; use a larger max_cache_len"
            )

    def reserve_decode(self, layer):
        pass  # no host check while decoding (it would synchronise); writes are clamped

    def get_seq_length(self, layer):
        return self.cumulative_length if layer.is_initialized else 0

    def get_mask_sizes(self, query_length):
        return self.max_cache_len, 0

    def get_max_length(self):
        return self.max_cache_len

    def reset(self):
        self.cumulative_length.zero_()

    def load_sequence(self, other):
        """A sequence of ``other`` (a :class:`StaticLengths`) was loaded: the
        token columns are the larger count (in place, on the device)."""
        theirs = other.cumulative_length.to(self.cumulative_length.device)
        self.cumulative_length.copy_(torch.maximum(self.cumulative_length, theirs))
