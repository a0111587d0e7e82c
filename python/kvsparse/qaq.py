"""QAQ: quality-adaptive quantization of the KV cache (per-token bit-widths).

Each cached token is stored with its own bit-width, separately for the keys
and the values, chosen from the paper's error bounds for a uniform quantizer
over the token's ``[min, max]`` range::

    B_t = ceil(log2((max - min) / (2 * sqrt(3) * sigma_t)))
    keys:   sigma_t^2 = log(T^3 / (T - 1) * sigma_s^2 + 1) / sum_d q_d^2
    values: sigma_t   = sigma_x / (sqrt(T) * S_t)

``T`` is the sequence length and ``S_t`` the largest attention weight token
``t`` received over the last ``n`` decode steps. ``B_t`` is rounded *up* into
an allowed set drawn from ``{0, 1, 2, 4, 8}`` (above the largest allowed:
the largest); the newest ``n_recent`` tokens keep the largest width. Width 0
stores no codes: the token reads as the midpoint of its range.

In each group (the elements sharing a scale: one token of one KV head, or one
token of all KV heads of the layer when ``shared=True``), the
``ceil(alpha / 2 * E)`` smallest and as many largest values are *outliers*:
stored apart, exactly, in the cache dtype, and excluded from the range
(the largest taken among the others; ties to the lower index; NaN ranks
first in both, so a NaN is stored as an outlier, and a NaN left among the
inliers makes the whole group dequantize to NaN; see qaq.h).

Storage of one quantized cache (:class:`QuantStore`, one for the keys and one
for the values of a layer; ``Hg = Hkv``, or ``1`` when shared;
``E = D * Hkv / Hg`` elements per group; ``n_out = 2 * ceil(alpha / 2 * E)``):

==========  =====================  ============================================
arena       [B, A] uint8           packed codes; group codes at a byte offset of
                                   its sequence's row, ``E * w / 8`` bytes read
                                   as 32-bit little-endian words of ``32 / w``
                                   codes, even elements in the low half-word,
                                   odd ones in the high (see qaq.h)
offsets     [B, Hg, cap] int32     byte offset of each group's codes
widths      [B, Hg, cap] uint8     bit-width, one of {0, 1, 2, 4, 8}
sz          [B, Hg, cap, 2] fp16   (scale, zero): x = zero + scale * code
                                   (width 0: zero + scale / 2, scale = max - min)
oidx        [B, Hg, cap, n_out]    int16 outlier index in the group (-1: unused)
oval        [B, Hg, cap, n_out]    outlier values, cache dtype
==========  =====================  ============================================

Bytes per token and group: ``E * w / 8`` codes + 4 (offset) + 1 (width) +
4 (scale, zero) + ``n_out * (2 + itemsize)`` (outliers); e.g. ``D = 64``,
``Hkv = 3``, ``alpha = 0.01``, fp16 cache (384 bytes per token in fp16):

* per-head groups (``E = 64``, ``n_out = 2``): 33 bytes per head at 2 bits
  (99 per token, 26%), 49 at 4 bits (147 per token, 38%);
* shared groups (``E = 192``, ``n_out = 2``): 65 bytes per token at 2 bits
  (17%), 113 at 4 bits (29%).

:func:`memory_report` counts them.

Offsets are the caller's: :func:`slot_offsets` gives every group a fixed
slot big enough for 8 bits (no saving, never moves), :func:`packed_offsets`
packs groups back to back for their widths (the compact layout;
:func:`compact` moves an existing cache into it). Lowering a width
(:func:`requantize`) re-packs a group in place at its offset.

Typical decode loop: :func:`quantize` the new token at the largest width;
:func:`attention` reads the packed cache directly (dequantizing in
registers) and can return ``p_max``, each token's largest attention weight
over the query heads of its KV head; keep the last ``n`` of them
(:class:`AttentionWindow`) for ``S_t``; from time to time compute new widths
(:func:`key_bits` / :func:`value_bits` on :func:`stored_range`) and
:func:`requantize`.

On CPU the values of ``seq_lens``/``pos``/``widths``/``offsets``/``oidx``
are validated; on CUDA they are trusted (a check would need a host sync): the
kernels clamp lengths and read a group whose codes would leave the arena as
width 0. Every CUDA op is graph-capturable. Head dim ``D``: a multiple of 8
up to 256 on CPU, 64, 80, 96, 128 or 256 on CUDA (attention there: head dim
64, 96, 128 or 256, at most 8 query heads per KV head, ``n_out <= 64``).
"""
import math
from typing import NamedTuple

import torch

from . import _ops

__all__ = [
    "WIDTHS",
    "MAX_GROUP_ELEMS",
    "QuantStore",
    "outlier_slots",
    "alloc",
    "slot_offsets",
    "packed_offsets",
    "quantize",
    "dequantize",
    "requantize",
    "key_bits",
    "value_bits",
    "stored_range",
    "query_sq",
    "uniform_tiles",
    "AttentionWindow",
    "attention",
    "sparse_attention",
    "memory_report",
    "compact",
]

#: The bit-widths a token may be stored with.
WIDTHS = (0, 1, 2, 4, 8)

#: Largest group size E (elements sharing a scale): outlier indices are int16.
MAX_GROUP_ELEMS = 32768


class QuantStore(NamedTuple):
    """One quantized cache (the keys or the values of one layer); see the module doc."""

    arena: torch.Tensor
    offsets: torch.Tensor
    widths: torch.Tensor
    sz: torch.Tensor
    oidx: torch.Tensor
    oval: torch.Tensor
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self):
        """Hg: groups per token (Hkv, or 1 when shared across KV heads)."""
        return self.offsets.shape[1]

    @property
    def group_elems(self):
        """E: elements per group."""
        return self.head_dim * (self.num_kv_heads // self.groups)

    @property
    def cap(self):
        return self.offsets.shape[2]

    def tensors(self):
        return (self.arena, self.offsets, self.widths, self.sz, self.oidx, self.oval)


def outlier_slots(alpha, group_elems):
    """``n_out = 2 * ceil(alpha / 2 * E)``: outlier slots per group.

    Raises ValueError unless ``0 <= alpha < 1`` and ``n_out < E``.
    """
    alpha = float(alpha)
    if not (0.0 <= alpha < 1.0) or math.isnan(alpha):
        raise ValueError(f"kvsparse: alpha (outlier fraction) must be in [0, 1), got {alpha}")
    n_side = math.ceil(alpha / 2 * group_elems - 1e-9) if alpha > 0 else 0
    n_out = 2 * n_side
    if n_out >= group_elems:
        raise ValueError(f"kvsparse: alpha = {alpha} leaves no inliers in a group of {group_elems} elements")
    return n_out


def _check_width(w, name):
    w = _ops.int_arg(w, name)
    if w not in WIDTHS:
        raise ValueError(f"kvsparse: {name} must be one of {WIDTHS}, got {w}")
    return w


def _pos_int(x, name, lo=1):
    v = _ops.int_arg(x, name)
    if v < lo:
        raise ValueError(f"kvsparse: {name} must be >= {lo}, got {v}")
    return v


def _tensor(x, name, dim=None, layout=""):
    if not torch.is_tensor(x):
        raise TypeError(f"kvsparse: {name} must be a torch.Tensor, got {type(x).__name__}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"kvsparse: {name} must be a {dim}-D tensor {layout}, got shape {tuple(x.shape)}")
    return x


def _check_store(store, name):
    if not isinstance(store, QuantStore):
        raise TypeError(f"kvsparse: {name} must be a QuantStore (see alloc), got {type(store).__name__}")
    return store


def alloc(B, num_kv_heads, cap, head_dim, dtype=torch.float16, device="cpu", alpha=0.01, shared=False,
          arena_bytes=None):
    """Allocate an empty quantized cache.

    Args:
        B, num_kv_heads, cap, head_dim: batch, KV heads, token capacity, head dim.
        dtype: the cache dtype (float32/float16/bfloat16); outlier values and
            dequantized outputs have it.
        alpha: outlier fraction; ``n_out = 2 * ceil(alpha / 2 * E)`` slots per group.
        shared: one width/scale/zero per token shared across the KV heads
            (``Hg = 1``) instead of one per token per KV head (``Hg = Hkv``).
        arena_bytes: bytes per sequence; default ``Hg * cap * E``, enough for
            every group at 8 bits in :func:`slot_offsets`.

    Returns:
        :class:`QuantStore` with every width 0 and offsets from :func:`slot_offsets`.
    """
    B = _pos_int(B, "B", 0)
    num_kv_heads = _pos_int(num_kv_heads, "num_kv_heads")
    cap = _pos_int(cap, "cap", 0)
    head_dim = _pos_int(head_dim, "head_dim")
    Hg = 1 if shared else num_kv_heads
    E = head_dim * (num_kv_heads // Hg)
    if E > MAX_GROUP_ELEMS:
        raise ValueError(
            f"kvsparse: the group size E = head_dim * num_kv_heads{'' if shared else ' / num_kv_heads'}"
            f" = {E} exceeds {MAX_GROUP_ELEMS} (outlier indices are int16); "
            f"use shared=False or fewer KV heads")
    n_out = outlier_slots(alpha, E)
    A = Hg * cap * E if arena_bytes is None else _pos_int(arena_bytes, "arena_bytes", 0)
    kw = dict(device=device)
    st = QuantStore(
        arena=torch.zeros(B, A, dtype=torch.uint8, **kw),
        offsets=torch.zeros(B, Hg, cap, dtype=torch.int32, **kw),
        widths=torch.zeros(B, Hg, cap, dtype=torch.uint8, **kw),
        sz=torch.zeros(B, Hg, cap, 2, dtype=torch.float16, **kw),
        oidx=torch.full((B, Hg, cap, n_out), -1, dtype=torch.int16, **kw),
        oval=torch.zeros(B, Hg, cap, n_out, dtype=dtype, **kw),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
    )
    st.offsets.copy_(slot_offsets(st))
    return st


def slot_offsets(store, max_width=8):
    """Fixed slots: group ``(g, t)`` at byte ``(g * cap + t) * E * max_width / 8``.

    Returns int32 ``[B, Hg, cap]`` on the store's device.
    """
    B, Hg, cap = store.offsets.shape
    per = store.group_elems * _check_width(max_width, "max_width") // 8
    o = torch.arange(Hg * cap, dtype=torch.int64, device=store.offsets.device) * per
    return o.view(1, Hg, cap).expand(B, Hg, cap).to(torch.int32).contiguous()


def packed_offsets(widths, group_elems):
    """Compact layout: groups back to back in ``(g, t)`` order within each sequence.

    Args:
        widths: uint8 ``[B, Hg, cap]``.
        group_elems: E.

    Returns:
        ``(offsets, nbytes)``: int32 ``[B, Hg, cap]`` and int64 ``[B]``, the
        bytes each sequence needs.
    """
    _tensor(widths, "widths", 3, "[B, Hg, cap]")
    group_elems = _pos_int(group_elems, "group_elems")
    B = widths.shape[0]
    size = widths.to(torch.int64).reshape(B, -1) * group_elems // 8
    end = size.cumsum(1)
    return (end - size).to(torch.int32).view(widths.shape), end[:, -1] if end.shape[1] else size.sum(1)


def quantize(store, x, pos, widths=8, offsets=None):
    """Quantize ``n`` tokens into the cache at positions ``pos[b] + i``, in place.

    Args:
        store: :class:`QuantStore`.
        x: ``[B, Hkv, n, D]`` in the store's dtype.
        pos: int32 ``[B]``, first position written per sequence
            (``pos[b] + n <= cap``).
        widths: an int in {0, 1, 2, 4, 8} or uint8 ``[B, Hg, n]``.
        offsets: int32 ``[B, Hg, n]`` byte offsets of the tokens' codes; default
            the offsets already in ``store.offsets`` at those positions.

    Returns:
        None. Writes widths, offsets, (scale, zero), outliers and codes.
    """
    _check_store(store, "store")
    _tensor(x, "x", 4, "[B, Hkv, n, D]")
    _tensor(pos, "pos", 1, "[B]")
    if x.dtype != store.oval.dtype:
        raise TypeError(f"kvsparse: x must be in the store's dtype {store.oval.dtype}, got {x.dtype}")
    if x.shape[1] != store.num_kv_heads or x.shape[3] != store.head_dim:
        raise ValueError(f"kvsparse: x must be [B, Hkv, n, D] with Hkv = {store.num_kv_heads} and "
                         f"D = {store.head_dim} (the store's num_kv_heads and head_dim), "
                         f"got shape {tuple(x.shape)}")
    B, Hg, cap = store.offsets.shape
    n = x.shape[2]
    dev = store.offsets.device
    if not torch.is_tensor(widths):
        widths = torch.full((B, Hg, n), _check_width(widths, "widths"), dtype=torch.uint8, device=dev)
    if offsets is None:
        t = (pos.to(device=dev, dtype=torch.int64)[:, None] + torch.arange(n, device=dev)[None]).clamp(0, max(cap - 1, 0))
        offsets = torch.gather(store.offsets, 2, t[:, None, :].expand(B, Hg, n)) if cap else \
            torch.zeros(B, Hg, n, dtype=torch.int32, device=dev)
    _ops.ops.qaq_quantize(x, pos, widths, offsets.contiguous(), *store.tensors(), store.num_kv_heads,
                          store.head_dim)


def dequantize(store, seq_lens):
    """Unpack and dequantize the whole cache.

    Returns:
        ``[B, Hkv, cap, D]`` in the store's dtype; zeros past ``seq_lens``.
    """
    _check_store(store, "store")
    return _ops.ops.qaq_dequantize(*store.tensors(), seq_lens, store.num_kv_heads, store.head_dim)


def requantize(store, new_widths, seq_lens):
    """Lower widths in place: every valid group whose ``new_widths`` entry is below
    its width is re-packed at that width (from its dequantized values, same
    outliers, same offset); the others are untouched.

    Args:
        new_widths: uint8 ``[B, Hg, cap]``, values in {0, 1, 2, 4, 8}.
    """
    _check_store(store, "store")
    _ops.ops.qaq_requantize(*store.tensors(), new_widths, seq_lens, store.num_kv_heads, store.head_dim)


def uniform_tiles(widths, seq_lens, tile=16):
    """Widths made uniform over aligned tiles of ``tile`` positions, so that the
    CUDA attention reads each tile at one key width and one value width (its
    width-specialised path; a tile mixing widths takes a per-row path).

    Each complete tile (``t // tile < seq_lens[b] // tile``) gets the largest
    width of its positions (never lower than any token's own bound: the cost
    is bytes, not accuracy); positions of the incomplete last tile get 8, so
    that :func:`requantize` (which only lowers) leaves them as they are until
    the tile fills. Applied at every re-quantization, a tile that starts
    uniform (tokens are written at the largest width) stays uniform.

    Args:
        widths: uint8 ``[B, Hg, cap]`` (e.g. from :func:`key_bits`).
        seq_lens: int32 ``[B]``.
        tile: positions per tile (``1``: unchanged).

    Returns:
        uint8 ``[B, Hg, cap]``.
    """
    _tensor(widths, "widths", 3, "[B, Hg, cap]")
    tile = _pos_int(tile, "tile")
    if tile == 1:
        return widths
    B, Hg, cap = widths.shape
    pad = (-cap) % tile
    w = torch.nn.functional.pad(widths, (0, pad)) if pad else widths
    nt = (cap + pad) // tile
    m = w.view(B, Hg, nt, tile).amax(-1, keepdim=True)  # [B, Hg, nt, 1]
    # complete tiles: index < seq_lens // tile (one comparison per tile, not per position)
    full = torch.arange(nt, device=widths.device, dtype=torch.int32).view(1, 1, nt, 1) < \
        torch.div(seq_lens.to(widths.device, torch.int32), tile, rounding_mode="floor").view(B, 1, 1, 1)
    m = torch.where(full, m, torch.full_like(m, 8))
    return m.expand(B, Hg, nt, tile).reshape(B, Hg, nt * tile)[..., :cap].contiguous()


def _allowed(allowed):
    try:
        a = [_ops.int_arg(w, "allowed") for w in allowed]
    except TypeError:
        raise TypeError(f"kvsparse: allowed must be an iterable of ints, got {allowed!r}") from None
    if not a or any(w not in WIDTHS for w in a):
        raise ValueError(f"kvsparse: allowed must be a non-empty subset of {WIDTHS}, got {list(allowed)}")
    return a


def key_bits(rng, q_sq, seq_lens, sigma_s, allowed=WIDTHS, n_recent=5):
    """Key bit-widths: ``sigma_t^2 = log(T^3 / (T-1) * sigma_s^2 + 1) / q_sq``.

    Args:
        rng: float32 ``[B, Hg, cap]``, each group's quantizer range (max - min),
            e.g. :func:`stored_range`.
        q_sq: float32 ``[B, Hg]``, ``sum_d q_d^2`` (see :func:`query_sq`).
        seq_lens: int32 ``[B]``: ``T``; positions ``>= T`` get 0.
        sigma_s: allowed standard deviation of the attention scores.
        allowed: allowed widths (subset of {0, 1, 2, 4, 8}).
        n_recent: the newest ``n_recent`` tokens get the largest allowed width.

    Returns:
        uint8 ``[B, Hg, cap]``.
    """
    return _ops.ops.qaq_key_bits(rng, q_sq, seq_lens, _ops.float_arg(sigma_s, "sigma_s"), _allowed(allowed), _ops.int_arg(n_recent, "n_recent"))


def value_bits(rng, s_max, seq_lens, sigma_x, allowed=WIDTHS, n_recent=5):
    """Value bit-widths: ``sigma_t = sigma_x / (sqrt(T) * S_t)``.

    Args:
        rng: float32 ``[B, Hg, cap]`` quantizer ranges.
        s_max: float32 ``[B, Hg, cap]``: ``S_t``, each token's largest attention
            weight over the window (see :class:`AttentionWindow`).
        seq_lens, allowed, n_recent: as :func:`key_bits`.
        sigma_x: allowed standard deviation of the attention output.

    Returns:
        uint8 ``[B, Hg, cap]``.
    """
    return _ops.ops.qaq_value_bits(rng, s_max, seq_lens, _ops.float_arg(sigma_x, "sigma_x"), _allowed(allowed), _ops.int_arg(n_recent, "n_recent"))


def stored_range(store):
    """Each group's quantizer range recovered from its (scale, width):
    ``scale * (2^w - 1)`` (``scale`` for width 0). float32 ``[B, Hg, cap]``."""
    steps = torch.exp2(store.widths.float()).sub_(1.0).clamp_(min=1.0)  # 2^w - 1, and 1 for w = 0
    return steps.mul_(store.sz[..., 0])


def query_sq(q, groups, scale=None):
    """``sum_d (scale * q_d)^2`` per group (the max over the group's query heads).

    Args:
        q: ``[B, H, D]``.
        groups: Hg (the number of groups per token; must divide H).
        scale: the softmax logit scale, default ``1 / sqrt(D)``.

    Returns:
        float32 ``[B, Hg]``.
    """
    _tensor(q, "q", 3, "[B, H, D]")
    B, H, D = q.shape
    groups = _pos_int(groups, "groups")
    if H % groups:
        raise ValueError(f"kvsparse: groups ({groups}) must divide the number of query heads H = {H}")
    if D == 0 and scale is None:
        raise ValueError(f"kvsparse: q must have D > 0 when scale is None, got shape {tuple(q.shape)}")
    s = 1.0 / math.sqrt(D) if scale is None else _ops.float_arg(scale, "scale")
    e = (q.float() * s).square().sum(-1)
    return e.view(B, groups, H // groups).amax(-1).contiguous()


class AttentionWindow:
    """The last ``n`` decode steps' ``p_max`` (ring buffer) and their max, ``S_t``.

    ``push(p_max)`` stores a step (float32 ``[B, Hkv, cap]`` from
    :func:`attention`); ``s_max(groups)`` returns float32 ``[B, Hg, cap]``:
    the max over the stored steps (and over the KV heads of a group).
    """

    def __init__(self, B, num_kv_heads, cap, n=5, device="cpu"):
        self.hist = torch.zeros(_pos_int(n, "n"), _pos_int(B, "B", 0), _pos_int(num_kv_heads, "num_kv_heads"),
                                _pos_int(cap, "cap", 0), dtype=torch.float32, device=device)
        #: steps pushed so far: a device tensor, so that a compiled (CUDA-graph)
        #: decode step advances the ring without a host counter
        self.step = torch.zeros((), dtype=torch.int64, device=device)

    def push(self, p_max):
        slot = torch.remainder(self.step, self.hist.shape[0]).view(1)
        self.hist.index_copy_(0, slot, p_max.unsqueeze(0).to(self.hist.dtype))
        self.step.add_(1)

    def tensors(self):
        """The window's state tensors (static addresses in a static layer)."""
        return [self.hist, self.step]

    def reset(self):
        self.hist.zero_()
        self.step.zero_()

    def nbytes(self):
        return self.hist.numel() * self.hist.element_size()

    def resized(self, cap):
        """A window of ``cap`` tokens holding this one's steps (the first ones)."""
        n, B, Hkv, old = self.hist.shape
        win = AttentionWindow(B, Hkv, cap, n=n, device=self.hist.device)
        m = min(old, cap)
        win.hist[..., :m].copy_(self.hist[..., :m])
        win.step.copy_(self.step)
        return win

    def load_sequence(self, b, other):
        """Sequence ``b``'s history becomes sequence 0 of ``other`` (a window of
        the same ``n``, or ``None``: empty), rotated so that its oldest step is
        the one overwritten next at this window's ring position (``step`` is
        shared by the batch)."""
        from .parts import copy_row

        src = None
        if other is not None:
            src = torch.roll(other.hist, shifts=int(self.step) - int(other.step), dims=0)
        copy_row(self.hist, b, src, dim=1)

    def map_batch(self, fn, in_place):
        """Apply ``fn`` to the batch dim (dim 1 of the history)."""
        hist = fn(self.hist.transpose(0, 1)).transpose(0, 1)
        if in_place:
            self.hist.copy_(hist)
        else:
            self.hist = hist.contiguous()

    def s_max(self, groups):
        n, B, Hkv, cap = self.hist.shape
        groups = _pos_int(groups, "groups")
        if Hkv % groups:
            raise ValueError(f"kvsparse: groups ({groups}) must divide the number of KV heads {Hkv}")
        # one reduction over the steps and the KV heads of a group
        return self.hist.view(n, B, groups, Hkv // groups, cap).amax(dim=(0, 3))


def _check_attention_args(q, k_store, v_store, scale):
    """The checks of :func:`attention` / :func:`sparse_attention` done before
    the op; returns the scale (default ``1 / sqrt(D)``)."""
    _check_store(k_store, "k_store")
    _check_store(v_store, "v_store")
    _tensor(q, "q", 3, "[B, H, D]")
    if (v_store.num_kv_heads, v_store.head_dim) != (k_store.num_kv_heads, k_store.head_dim):
        raise ValueError(f"kvsparse: v_store (num_kv_heads {v_store.num_kv_heads}, head_dim {v_store.head_dim}) "
                         f"must match k_store ({k_store.num_kv_heads}, {k_store.head_dim})")
    if q.shape[-1] != k_store.head_dim:
        raise ValueError(f"kvsparse: q.shape[2] (D) must equal the stores' head_dim = {k_store.head_dim}, "
                         f"got shape {tuple(q.shape)}")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def attention(q, k_store, v_store, seq_lens, scale=None, return_p_max=False):
    """Decode attention reading the packed caches directly.

    ``out[b, h] = softmax_t(scale * q[b, h] . K~[b, hk, t]) @ V~[b, hk, :len]``
    over ``t < seq_lens[b]``, ``hk = h // (H // Hkv)``, ``K~``/``V~`` the
    dequantized caches (dequantized on the fly, never materialized); float32
    accumulation, stable softmax; zeros for an empty sequence.

    Args:
        q: ``[B, H, D]``, the stores' dtype.
        k_store, v_store: :class:`QuantStore` (same B, Hkv, cap, D; each may be
            shared or per-head).
        seq_lens: int32 ``[B]`` in ``[0, cap]``.
        scale: logit scale, default ``1 / sqrt(D)``.
        return_p_max: also return ``p_max``.

    Returns:
        ``out`` ``[B, H, D]`` (q's dtype), or ``(out, p_max)`` with ``p_max``
        float32 ``[B, Hkv, cap]``: each token's largest attention probability
        over the query heads of its KV head (0 past ``seq_lens``).
    """
    scale = _check_attention_args(q, k_store, v_store, scale)
    out, pm = _ops.ops.qaq_attention(q, *k_store.tensors(), *v_store.tensors(), seq_lens,
                                     k_store.num_kv_heads, k_store.head_dim, _ops.float_arg(scale, "scale"),
                                     bool(return_p_max))
    return (out, pm) if return_p_max else out



def sparse_attention(q, k_store, v_store, page_idx, seq_lens, page_size=16, scale=None, return_p_max=False):
    """Decode attention over the packed caches, restricted to selected pages
    (Quest's selection over a QAQ cache).

    Per KV head ``hk`` of sequence ``b``, only the tokens of the pages
    ``page_idx[b, hk]`` are attended: page ``p`` holds tokens ``[p * P, (p + 1)
    * P)``; ``-1`` entries and tokens past ``seq_lens[b]`` select nothing.
    Only those tokens' metadata and code bytes are read and dequantized (in
    registers on CUDA: the same kernel as :func:`attention`, reading each
    row's tokens through its page list). ``out[b, h] = softmax(scale * q[b, h]
    . K~) @ V~`` over the selected tokens (zeros when none is selected).

    Args:
        q: ``[B, H, D]``, the stores' dtype.
        k_store, v_store: :class:`QuantStore` as in :func:`attention`.
        page_idx: int32 ``[B, Hkv, n_sel]``: distinct page indices in
            ``[0, ceil(cap / P))`` or ``-1`` (e.g. :func:`kvsparse.quest.select_pages`
            of per-KV-head scores); ``n_sel <= ceil(cap / P)``.
        seq_lens: int32 ``[B]`` in ``[0, cap]``.
        page_size: ``P``.
        scale: logit scale, default ``1 / sqrt(D)``.
        return_p_max: also return ``p_max``.

    Returns:
        ``out`` ``[B, H, D]``, or ``(out, p_max)`` with ``p_max`` float32
        ``[B, Hkv, n_sel * P]``: per slot ``i * P + j`` (token
        ``page_idx[b, hk, i] * P + j``) the largest attention probability over
        the query heads of its KV head, 0 for a slot that selects nothing.
    """
    scale = _check_attention_args(q, k_store, v_store, scale)
    out, pm = _ops.ops.qaq_sparse_attention(q, *k_store.tensors(), *v_store.tensors(), page_idx, seq_lens,
                                            k_store.num_kv_heads, k_store.head_dim,
                                            _ops.int_arg(page_size, "page_size"),
                                            _ops.float_arg(scale, "scale"), bool(return_p_max))
    return (out, pm) if return_p_max else out

def memory_report(store, seq_lens):
    """True bytes in use for the valid tokens against an fp16 cache.

    Returns:
        dict of ints: ``codes``, ``scale_zero``, ``widths``, ``offsets``,
        ``outliers`` (indices + values), ``total`` (their sum), ``fp16`` (an fp16
        cache of the same tokens), ``arena`` (bytes allocated for codes), and
        ``ratio = total / fp16`` (float).
    """
    B, Hg, cap = store.offsets.shape
    lens = seq_lens.to(device=store.widths.device, dtype=torch.int64).clamp(0, cap)
    valid = torch.arange(cap, device=lens.device)[None, None, :] < lens[:, None, None]
    ngroups = int(lens.sum()) * Hg
    codes = int((store.widths.to(torch.int64) * valid).sum()) * store.group_elems // 8
    n_out = store.oidx.shape[-1]
    rep = dict(
        codes=codes,
        scale_zero=ngroups * 4,
        widths=ngroups,
        offsets=ngroups * 4,
        outliers=ngroups * n_out * (2 + store.oval.element_size()),
    )
    rep["total"] = sum(rep.values())
    rep["fp16"] = int(lens.sum()) * store.num_kv_heads * store.head_dim * 2
    rep["arena"] = store.arena.numel()
    rep["ratio"] = rep["total"] / rep["fp16"] if rep["fp16"] else 0.0
    return rep


def compact(store, seq_lens):
    """A copy of the cache in the compact layout (:func:`packed_offsets`), codes
    moved byte for byte (exact); the arena is as long as the longest sequence
    needs. Not graph-capturable (sizes depend on the widths).

    Returns:
        a new :class:`QuantStore`.
    """
    B, Hg, cap = store.offsets.shape
    dev = store.arena.device
    lens = seq_lens.to(device=dev, dtype=torch.int64).clamp(0, cap)
    valid = torch.arange(cap, device=dev)[None, None, :] < lens[:, None, None]
    widths = torch.where(valid, store.widths, torch.zeros_like(store.widths))
    offs, nbytes = packed_offsets(widths, store.group_elems)
    A = max(int(nbytes.max()) if B else 0, 1)
    arena = torch.zeros(B, A, dtype=torch.uint8, device=dev)
    size = (widths.to(torch.int64) * store.group_elems // 8).reshape(B, -1)
    src = store.offsets.to(torch.int64).reshape(B, -1)
    dst = offs.to(torch.int64).reshape(B, -1)
    for b in range(B):
        n = size[b]
        tot = int(n.sum())
        if tot == 0:
            continue
        start = torch.repeat_interleave(n.cumsum(0) - n, n)
        k = torch.arange(tot, device=dev) - start
        arena[b, torch.repeat_interleave(dst[b], n) + k] = store.arena[b, torch.repeat_interleave(src[b], n) + k]
    return store._replace(arena=arena, offsets=offs.contiguous(), widths=widths.contiguous(),
                          sz=store.sz.clone(), oidx=store.oidx.clone(), oval=store.oval.clone())


# ---- fake kernels --------------------------------------------------------------
# Output shapes and dtypes for FakeTensor / torch.compile / torch.export, with
# the structural checks of csrc/ops/qaq.cpp (values, contiguity and the
# CUDA-only limits are left to the real op).

_MAX_GROUP = 32768  # KS_QAQ_MAX_GROUP: outlier indices are int16


def _check_heads(Hkv, D, device):
    torch._check_value(Hkv >= 1, lambda: f"kvsparse: num_kv_heads must be >= 1, got {Hkv}")
    _ops.check_head_dim(D, device)


def _check_store_fake(arena, offsets, widths, sz, oidx, oval, ref, ref_name, Hkv, D, p=""):
    """The structure of a store's tensors (check_qstore); returns (B, Hg, cap)."""
    n = {f: p + f for f in ("arena", "offsets", "widths", "sz", "oidx", "oval")}
    _ops.check_dtype(arena, torch.uint8, n["arena"])
    _ops.check_dim(arena, 2, n["arena"], "[B, A]")
    _ops.check_device(arena, n["arena"], ref, ref_name)
    B, A = arena.shape
    _ops.check_dtype(offsets, torch.int32, n["offsets"])
    _ops.check_dim(offsets, 3, n["offsets"], "[B, Hg, cap]")
    _ops.check_device(offsets, n["offsets"], ref, ref_name)
    _ops.check_size(offsets, 0, B, n["offsets"], "B, as arena.shape[0]")
    Hg, cap = offsets.shape[1], offsets.shape[2]
    torch._check_value(cap <= _ops._INT32_MAX, lambda: f"kvsparse: {n['offsets']}.shape[2] (cap) must be <= 2^31 - 1, got {cap}")
    torch._check_value(Hg == Hkv or Hg == 1,
                       lambda: f"kvsparse: {n['offsets']}.shape[1] (Hg) must be Hkv = {Hkv} or 1, got shape {tuple(offsets.shape)}")
    _ops.check_dtype(widths, torch.uint8, n["widths"])
    _ops.check_device(widths, n["widths"], ref, ref_name)
    _ops.check_same_shape(widths, n["widths"], offsets, n["offsets"])
    _ops.check_dtype(sz, torch.float16, n["sz"])
    _ops.check_device(sz, n["sz"], ref, ref_name)
    _ops.check_dim(sz, 4, n["sz"], "[B, Hg, cap, 2]")
    for d, size, what in ((0, B, "B"), (1, Hg, "Hg"), (2, cap, "cap"), (3, 2, "scale, zero")):
        _ops.check_size(sz, d, size, n["sz"], what)
    _ops.check_dtype(oidx, torch.int16, n["oidx"])
    _ops.check_device(oidx, n["oidx"], ref, ref_name)
    _ops.check_dim(oidx, 4, n["oidx"], "[B, Hg, cap, n_out]")
    for d, size, what in ((0, B, "B"), (1, Hg, "Hg"), (2, cap, "cap")):
        _ops.check_size(oidx, d, size, n["oidx"], what)
    n_out, E = oidx.shape[3], D * (Hkv // Hg)
    torch._check_value(E <= _MAX_GROUP, lambda: f"kvsparse: the group size E = head_dim * num_kv_heads / Hg = {E} "
                       f"must be <= {_MAX_GROUP}")
    torch._check_value(n_out % 2 == 0 and n_out < E, lambda: f"kvsparse: {n['oidx']}.shape[3] (n_out) must be even and "
                       f"smaller than the group size E = {E}, got {n_out}")
    _ops.check_float(oval, n["oval"])
    _ops.check_device(oval, n["oval"], ref, ref_name)
    _ops.check_same_shape(oval, n["oval"], oidx, n["oidx"])
    torch._check_value(A < (1 << 31), lambda: f"kvsparse: {n['arena']}.shape[1] (bytes per sequence) must be < 2^31, got {A}")
    return B, Hg, cap


def _bits_fake(rng, aux, aux_name, seq_lens, sigma, sigma_name, allowed, n_recent):
    _ops.check_dtype(rng, torch.float32, "rng")
    _ops.check_dim(rng, 3, "rng", "[B, Hg, cap]")
    B, Hg, cap = rng.shape
    sizes, layout = ((B, Hg), "[B, Hg]") if aux_name == "q_sq" else ((B, Hg, cap), "[B, Hg, cap]")
    _ops.check_dtype(aux, torch.float32, aux_name)
    torch._check_value(aux.dim() == len(sizes) and all(a == b for a, b in zip(aux.shape, sizes)),
                       lambda: f"kvsparse: {aux_name} must have shape {layout} = {sizes}, got {tuple(aux.shape)}")
    _ops.check_device(aux, aux_name, rng, "rng")
    _ops.check_lens(seq_lens, "seq_lens", B, rng, "rng")
    torch._check_value(len(allowed) > 0, lambda: "kvsparse: allowed (the allowed bit-widths) must not be empty")
    for w in allowed:
        torch._check_value(w in (0, 1, 2, 4, 8), lambda: f"kvsparse: allowed contains the width {w}; "
                           "each width must be one of {0, 1, 2, 4, 8}")
    torch._check_value(n_recent >= 0, lambda: f"kvsparse: n_recent must be >= 0, got {n_recent}")
    torch._check_value(sigma >= 0.0, lambda: f"kvsparse: {sigma_name} must be >= 0, got {sigma}")
    return rng.new_empty(rng.shape, dtype=torch.uint8)


@torch.library.register_fake("kvsparse::qaq_key_bits")
def _qaq_key_bits_fake(rng, q_sq, seq_lens, sigma_s, allowed, n_recent):
    return _bits_fake(rng, q_sq, "q_sq", seq_lens, sigma_s, "sigma_s", allowed, n_recent)


@torch.library.register_fake("kvsparse::qaq_value_bits")
def _qaq_value_bits_fake(rng, s_max, seq_lens, sigma_x, allowed, n_recent):
    return _bits_fake(rng, s_max, "s_max", seq_lens, sigma_x, "sigma_x", allowed, n_recent)


@torch.library.register_fake("kvsparse::qaq_quantize")
def _qaq_quantize_fake(x, pos, new_widths, new_offsets, arena, offsets, widths, sz, oidx, oval, num_kv_heads,
                       head_dim):
    _check_heads(num_kv_heads, head_dim, x.device)
    _, Hkv, n, D = _ops.check_cache(x, "x")
    torch._check_value(Hkv == num_kv_heads and D == head_dim,
                       lambda: f"kvsparse: x must have shape [B, Hkv, n, D] with the store's num_kv_heads = "
                       f"{num_kv_heads} and head_dim = {head_dim}, got shape {tuple(x.shape)}")
    B, Hg, _ = _check_store_fake(arena, offsets, widths, sz, oidx, oval, x, "x", Hkv, D)
    _ops.check_same_dtype(oval, "oval", x, "x")
    _ops.check_size(x, 0, B, "x", "B, as arena.shape[0]")
    _ops.check_lens(pos, "pos", B, x, "x")
    _ops.check_dtype(new_widths, torch.uint8, "new_widths")
    _ops.check_dtype(new_offsets, torch.int32, "new_offsets")
    for t, name in ((new_widths, "new_widths"), (new_offsets, "new_offsets")):
        torch._check_value(t.dim() == 3 and t.shape[0] == B and t.shape[1] == Hg and t.shape[2] == n,
                           lambda: f"kvsparse: {name} must have shape [B, Hg, n] = [{B}, {Hg}, {n}], got {tuple(t.shape)}")
        _ops.check_device(t, name, x, "x")
    return None


@torch.library.register_fake("kvsparse::qaq_dequantize")
def _qaq_dequantize_fake(arena, offsets, widths, sz, oidx, oval, seq_lens, num_kv_heads, head_dim):
    _check_heads(num_kv_heads, head_dim, arena.device)
    B, _, cap = _check_store_fake(arena, offsets, widths, sz, oidx, oval, arena, "arena", num_kv_heads, head_dim)
    _ops.check_lens(seq_lens, "seq_lens", B, arena, "arena")
    return oval.new_empty((B, num_kv_heads, cap, head_dim))


@torch.library.register_fake("kvsparse::qaq_requantize")
def _qaq_requantize_fake(arena, offsets, widths, sz, oidx, oval, new_widths, seq_lens, num_kv_heads, head_dim):
    _check_heads(num_kv_heads, head_dim, arena.device)
    B, _, _ = _check_store_fake(arena, offsets, widths, sz, oidx, oval, arena, "arena", num_kv_heads, head_dim)
    _ops.check_lens(seq_lens, "seq_lens", B, arena, "arena")
    _ops.check_dtype(new_widths, torch.uint8, "new_widths")
    _ops.check_same_shape(new_widths, "new_widths", widths, "widths")
    _ops.check_device(new_widths, "new_widths", arena, "arena")
    return None


@torch.library.register_fake("kvsparse::qaq_attention")
def _qaq_attention_fake(q, k_arena, k_offsets, k_widths, k_sz, k_oidx, k_oval, v_arena, v_offsets, v_widths,
                        v_sz, v_oidx, v_oval, seq_lens, num_kv_heads, head_dim, scale, return_p_max):
    B, H, D = _ops.check_q(q)
    _check_heads(num_kv_heads, head_dim, q.device)
    torch._check_value(D == head_dim, lambda: f"kvsparse: q.shape[2] (D) must be the stores' head_dim = {head_dim}, "
                       f"got shape {tuple(q.shape)}")
    _ops.check_gqa(H, num_kv_heads)
    _, _, k_cap = _check_store_fake(k_arena, k_offsets, k_widths, k_sz, k_oidx, k_oval, q, "q", num_kv_heads, D, "k_")
    _, _, v_cap = _check_store_fake(v_arena, v_offsets, v_widths, v_sz, v_oidx, v_oval, q, "q", num_kv_heads, D, "v_")
    _ops.check_same_dtype(k_oval, "k_oval", q, "q")
    _ops.check_same_dtype(v_oval, "v_oval", q, "q")
    _ops.check_size(k_arena, 0, B, "k_arena", "B, as q.shape[0]")
    _ops.check_size(v_arena, 0, B, "v_arena", "B, as q.shape[0]")
    torch._check_value(v_cap == k_cap, lambda: f"kvsparse: v_offsets.shape[2] (cap) must equal k_offsets.shape[2] = {k_cap}, "
                       f"got {v_cap}")
    _ops.check_lens(seq_lens, "seq_lens", B, q, "q")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if return_p_max:
        pm = q.new_empty((B, num_kv_heads, k_cap), dtype=torch.float32)
    else:
        pm = q.new_empty((0,), dtype=torch.float32)
    return out, pm


@torch.library.register_fake("kvsparse::qaq_sparse_attention")
def _qaq_sparse_attention_fake(q, k_arena, k_offsets, k_widths, k_sz, k_oidx, k_oval, v_arena, v_offsets,
                               v_widths, v_sz, v_oidx, v_oval, page_idx, seq_lens, num_kv_heads, head_dim,
                               page_size, scale, return_p_max):
    out, _ = _qaq_attention_fake(q, k_arena, k_offsets, k_widths, k_sz, k_oidx, k_oval, v_arena, v_offsets,
                                 v_widths, v_sz, v_oidx, v_oval, seq_lens, num_kv_heads, head_dim, scale, False)
    B, cap = q.shape[0], k_offsets.shape[2]
    torch._check_value(1 <= page_size <= _ops._INT32_MAX,
                       lambda: f"kvsparse: page_size must be in [1, {_ops._INT32_MAX}], got {page_size}")
    _ops.check_dtype(page_idx, torch.int32, "page_idx")
    _ops.check_dim(page_idx, 3, "page_idx", "[B, Hkv, n_sel]")
    _ops.check_device(page_idx, "page_idx", q, "q")
    _ops.check_size(page_idx, 0, B, "page_idx", "B, as q.shape[0]")
    _ops.check_size(page_idx, 1, num_kv_heads, "page_idx", "num_kv_heads (one page list per KV head)")
    n_sel, max_pages = page_idx.shape[2], -(-cap // page_size)
    torch._check_value(n_sel <= max_pages, lambda: f"kvsparse: page_idx.shape[2] (n_sel) must be <= "
                       f"ceil(cap / page_size) = {max_pages}, got {n_sel}")
    pm = q.new_empty((B, num_kv_heads, n_sel * page_size) if return_p_max else (0,), dtype=torch.float32)
    return out, pm


# a list or NumPy array where a tensor belongs: TypeError naming it
_ops.wrap_public(globals(), __all__)
