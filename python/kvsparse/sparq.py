"""SparQ: sparse-query attention with mean-value reallocation (decode step).

For one decode step and one KV group SparQ

1. picks the ``r`` query channels ``i1`` with the largest ``|q|`` (in group
   mode the ``|q|`` of the ``G`` query heads sharing a KV head are summed, so a
   group shares one ``i1``; ties go to the lower channel);
2. approximates the attention probabilities from those channels only:
   ``s_hat = softmax(q[i1] . K[:, i1]^T / tau)`` over the valid tokens, with
   ``tau = sqrt(D * ||q[i1]||_1 / ||q||_1)`` per query head. ``K[:, i1]`` is read
   from ``kt``, a channel-major copy of the keys, so each of the ``r`` rows is
   contiguous over tokens;
3. keeps the ``k`` positions ``i2`` with the largest ``s_hat`` (group mode: of
   the group's summed ``s_hat``; ties to the lower position), optionally
   always including the last ``local_window`` positions (they count towards
   ``k``); ``k >= length`` keeps every position;
4. runs exact attention over ``K[i2], V[i2]``;
5. mixes in the mean value: ``y = alpha * y_topk + (1 - alpha) * v_mean`` with
   ``alpha = sum_{t in i2} s_hat[t]`` per query head (``reallocate=False``:
   ``y = y_topk``).

Shapes (all tensors contiguous, on one device):

==========  ===========================  ======================================
q           [B, H, D]                    decode query, float32/float16/bfloat16
k, v        [B, Hkv, cap, D]             KV cache, q's dtype
kt          [B, Hkv, D, cap]             ``k`` transposed (channel-major), q's dtype
v_mean      [B, Hkv, D] float32          mean of ``v`` over the valid tokens
seq_lens    [B] int32                    valid tokens per sequence, in [0, cap]
i1          [B, Hs, r] int32             top channels, ascending
s_hat       [B, H, cap] float32          approximate probabilities; 0 past seq_lens
i2          [B, Hs, k] int32             kept positions, ascending, -1 padded
==========  ===========================  ======================================

``H`` must be a multiple of ``Hkv``: query head ``h`` reads KV head
``h // (H // Hkv)``. ``Hs = Hkv`` in group mode, ``H`` in head mode. Head dim
``D``: a multiple of 8 up to 256 on CPU, 64, 80, 96, 128 or 256 on CUDA (where group mode
allows at most 8 query heads per KV head).

Cache maintenance: :func:`build` makes ``kt`` and ``v_mean`` from a full cache;
:func:`append` writes new tokens into ``k``, ``v`` and ``kt`` and updates
``v_mean`` incrementally. Neither changes ``seq_lens``: after
``append(..., seq_lens)`` the caller adds the number of new tokens.

On CPU the values of ``seq_lens``/``i1``/``i2`` are validated; on CUDA they are
trusted (checking them needs a host sync and would break CUDA graphs) and the
kernels clamp them. Every CUDA op is graph-capturable.
"""
import math

import torch

from . import _ops

__all__ = [
    "build",
    "append",
    "top_channels",
    "approx_scores",
    "top_positions",
    "sparse_attention",
    "attention",
    "choose_r_k",
    "check_cache",
]

_MODES = ("group", "head")


def _group_flag(mode):
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"kvsparse: mode must be 'group' or 'head', got {mode!r}")
    return mode == "group"


def _scale(q, scale):
    if scale is None:
        if not torch.is_tensor(q):
            raise TypeError(f"kvsparse: q must be a torch.Tensor, got {type(q).__name__}")
        if q.dim() < 1 or q.shape[-1] == 0:
            raise ValueError(f"kvsparse: q must be [B, H, D] with D > 0, got shape {tuple(q.shape)}")
        return 1.0 / math.sqrt(q.shape[-1])
    return _ops.float_arg(scale, "scale")


def build(k, v, seq_lens):
    """Build SparQ's cache side data from a full KV cache.

    Args:
        k, v: ``[B, Hkv, cap, D]``, float32/float16/bfloat16 (same dtype).
        seq_lens: ``[B]`` int32 in ``[0, cap]``.

    Returns:
        ``(kt, v_mean)``: ``kt`` ``[B, Hkv, D, cap]`` in k's dtype, exactly
        ``k.transpose(2, 3)`` (the whole cache, valid or not); ``v_mean``
        float32 ``[B, Hkv, D]``, the mean of ``v[b, :, :seq_lens[b]]`` over
        tokens (zeros for an empty sequence).
    """
    return _ops.ops.sparq_build(k, v, seq_lens)


def append(k_new, v_new, k, v, kt, v_mean, seq_lens):
    """Append tokens to a SparQ cache, in place.

    For every sequence ``b`` with ``len = seq_lens[b]`` (the length *before*
    the append) and ``n = k_new.shape[2]``, writes ``k_new[b, :, i]`` /
    ``v_new[b, :, i]`` at position ``len + i`` of ``k``, ``v`` and ``kt`` and
    updates the running mean
    ``v_mean += (sum_i v_new[b, :, i] - n * v_mean) / (len + n)`` (float32;
    never recomputed from the cache). ``seq_lens`` is **not** modified: the
    caller adds ``n`` afterwards (e.g. ``seq_lens += n``).

    Args:
        k_new, v_new: ``[B, Hkv, n, D]``, the cache's dtype.
        k, v: ``[B, Hkv, cap, D]``; modified in place.
        kt: ``[B, Hkv, D, cap]``; modified in place.
        v_mean: float32 ``[B, Hkv, D]``, up to date for ``seq_lens``; modified
            in place.
        seq_lens: ``[B]`` int32 with ``seq_lens[b] + n <= cap`` (on CUDA a
            sequence that would overflow is left untouched).

    Returns:
        None.
    """
    _ops.ops.sparq_append(k_new, v_new, k, v, kt, v_mean, seq_lens)


def top_channels(q, r, group_size=1):
    """Step 1: the ``r`` channels with the largest ``|q|``.

    Args:
        q: ``[B, H, D]``.
        r: channels to keep, in ``[1, D]``.
        group_size: query heads per row: ``1`` (head mode, one set per query
            head) or ``H // Hkv`` (group mode, the ``|q|`` of each group's
            heads summed in float32 in head order); must divide ``H``.

    Returns:
        int32 ``[B, H // group_size, r]``: channel indices in ascending
        order (which ``r`` channels: largest key first, ties to the lower
        channel, NaN ranks lowest).
    """
    return _ops.ops.sparq_top_channels(q, _ops.int_arg(r, "r"), _ops.int_arg(group_size, "group_size"))


def approx_scores(q, kt, i1, seq_lens):
    """Step 2: approximate attention probabilities from the ``r`` channels ``i1``.

    ``s_hat[b, h, t] = softmax_t(sum_j q[b,h,c_j] * kt[b,hk,c_j,t] / tau)`` for
    ``t < seq_lens[b]`` with ``c = i1[b, row(h)]`` and
    ``tau = sqrt(D * sum_j |q[b,h,c_j]| / sum_d |q[b,h,d]|)`` (each head uses its
    own ``q`` values, also on a shared ``i1``); float32, numerically stable.
    Positions ``t >= seq_lens[b]`` get probability 0 (never ``-inf``); an
    empty sequence gives a row of zeros.

    Args:
        q: ``[B, H, D]``.
        kt: ``[B, Hkv, D, cap]``, q's dtype (see :func:`build`).
        i1: int32 ``[B, Hs, r]`` with ``Hs`` in ``{H, Hkv}``; values in ``[0, D)``.
        seq_lens: ``[B]`` int32 in ``[0, cap]``.

    Returns:
        float32 ``[B, H, cap]``.
    """
    return _ops.ops.sparq_approx_scores(q, kt, i1, seq_lens)


def top_positions(s_hat, seq_lens, k, local_window=0, group_size=1):
    """Step 3: the positions to attend to.

    For each row with ``len = seq_lens[b]``: if ``k >= len`` every position
    ``0 .. len-1``; else, with ``w = min(local_window, k)``, the last ``w``
    positions plus the ``k - w`` highest-scoring positions among
    ``0 .. len-w-1`` (ties to the lower position). Computed on the device,
    without a host sync.

    Args:
        s_hat: float32 ``[B, H, cap]`` (from :func:`approx_scores`).
        seq_lens: ``[B]`` int32 in ``[0, cap]``.
        k: positions to keep, ``1 <= k <= cap``.
        local_window: trailing positions always kept (>= 0; they count
            towards ``k``).
        group_size: ``1`` (head mode) or ``H // Hkv`` (group mode: the key of a
            position is the float32 sum, in head order, of the group's
            ``s_hat``).

    Returns:
        int32 ``[B, H // group_size, k]``: ascending positions, padded with
        ``-1`` when fewer than ``k`` positions are valid.
    """
    return _ops.ops.sparq_top_positions(s_hat, seq_lens, _ops.int_arg(k, "k"), _ops.int_arg(local_window, "local_window"), _ops.int_arg(group_size, "group_size"))


def sparse_attention(q, k, v, i2, s_hat, v_mean, seq_lens, scale=None, reallocate=True):
    """Steps 4 and 5: exact attention over ``i2`` with mean-value reallocation.

    ``y_topk[b, h] = softmax_t(scale * q[b,h] . k[b,hk,t]) @ v[b,hk,t]`` over the
    entries ``t`` of ``i2[b, row(h)]`` with ``0 <= t < seq_lens[b]`` (``-1``
    skipped; float32 accumulation, stable softmax; zeros if none). With
    ``reallocate``: ``out = alpha * y_topk + (1 - alpha) * v_mean[b, hk]``,
    ``alpha = sum_{t} s_hat[b, h, t]`` over the same entries (so an empty row
    gives ``v_mean``); without it ``out = y_topk``.

    Args:
        q: ``[B, H, D]``.
        k, v: ``[B, Hkv, cap, D]``, q's dtype.
        i2: int32 ``[B, Hs, n]``, ``Hs`` in ``{H, Hkv}``; values ``-1`` or in
            ``[0, cap)``, expected distinct.
        s_hat: float32 ``[B, H, cap]``.
        v_mean: float32 ``[B, Hkv, D]``.
        seq_lens: ``[B]`` int32 in ``[0, cap]``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        reallocate: mix in ``v_mean`` (default True).

    Returns:
        ``[B, H, D]`` in q's dtype.
    """
    return _ops.ops.sparq_sparse_attention(
        q, k, v, i2, s_hat, v_mean, seq_lens, _scale(q, scale), bool(reallocate)
    )


def attention(q, k, v, kt, v_mean, seq_lens, r, k_top, local_window=0, mode="group",
              reallocate=True, scale=None):
    """Fused SparQ decode attention (steps 1-5).

    Same result as ``sparse_attention(q, k, v, top_positions(approx_scores(q,
    kt, top_channels(q, r, G), seq_lens), seq_lens, k_top, local_window, G),
    s_hat, v_mean, seq_lens, scale, reallocate)`` with ``G = H // Hkv`` in group
    mode, ``1`` in head mode. With ``k_top >= seq_lens[b]`` and
    ``reallocate=False`` it is dense attention over the valid prefix. On CUDA
    it is graph-capturable (no host sync; workspace sized from shapes only).

    Args:
        q: ``[B, H, D]``.
        k, v: ``[B, Hkv, cap, D]``, q's dtype.
        kt: ``[B, Hkv, D, cap]`` and v_mean float32 ``[B, Hkv, D]``, up to
            date for ``seq_lens`` (see :func:`build`, :func:`append`); their
            contents are trusted (:func:`check_cache` compares them with
            ``k`` and ``v``).
        seq_lens: ``[B]`` int32 in ``[0, cap]``.
        r: query channels used for the approximate scores, ``1 <= r <= D``.
        k_top: positions attended per row, ``1 <= k_top <= cap``.
        local_window: trailing positions always kept (count towards ``k_top``).
        mode: ``"group"`` (one ``i1``/``i2`` per KV head) or ``"head"``.
        reallocate: mean-value reallocation (default True).
        scale: softmax scale of the exact attention, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, D]`` in q's dtype.
    """
    group = _group_flag(mode)
    return _ops.ops.sparq_attention(
        q, k, v, kt, v_mean, seq_lens, _ops.int_arg(r, "r"), _ops.int_arg(k_top, "k_top"), _ops.int_arg(local_window, "local_window"), group,
        bool(reallocate), _scale(q, scale),
    )


def _round_half_up(x):
    return int(math.floor(x + 0.5))


def choose_r_k(D, seq_len, compression):
    """Pick ``(r, k)`` for a target memory-transfer ratio.

    Bytes read per KV head and step (elements, ignoring the ``D`` of
    ``v_mean`` and the query): dense attention reads ``K`` and ``V`` in full,
    ``2 * S * D``; SparQ reads ``r`` rows of ``kt`` (``r * S``) and ``K``, ``V``
    at ``k`` positions (``2 * k * D``). The ratio is therefore
    ``r / (2 D) + k / S``. We spend half of the target ``compression`` on each
    stage -- ``r / (2 D) = c / 2`` and ``k / S = c / 2`` -- which gives

        ``r = round(c * D)``, clamped to ``[1, D]``;
        ``k = round(c * S / 2)``, clamped to ``[1, S]``

    (round half up). Splitting evenly keeps both approximations equally
    coarse: the channel count controls how well ``s_hat`` ranks the tokens and
    ``k`` how much of the attention mass is covered. For ``c = 1/8`` and
    ``D = 128`` this is ``r = 16`` and ``k = S / 16``. Because of the clamps,
    the achieved ratio can exceed ``c`` for tiny ``D * c`` or ``S * c``.

    Args:
        D: head dim (>= 1).
        seq_len: tokens in the cache ``S`` (>= 1).
        compression: target ratio ``c`` in ``(0, 1]``.

    Returns:
        ``(r, k)``, Python ints.
    """
    D = int(D)
    S = int(seq_len)
    c = float(compression)
    if D < 1:
        raise ValueError(f"kvsparse: D must be >= 1, got {D}")
    if S < 1:
        raise ValueError(f"kvsparse: seq_len must be >= 1, got {S}")
    if not (0.0 < c <= 1.0):
        raise ValueError(f"kvsparse: compression must be in (0, 1], got {compression}")
    r = min(D, max(1, _round_half_up(c * D)))
    k = min(S, max(1, _round_half_up(c * S / 2.0)))
    return r, k


# ---- fake kernels --------------------------------------------------------------
# Output shapes and dtypes for FakeTensor / torch.compile / torch.export, with
# the structural checks of csrc/ops/sparq.cpp (values, contiguity and the
# CUDA-only limits are left to the real op).


def _check_kv_pair(k, v):
    """k [B, Hkv, cap, D] and v of its dtype, device and shape; returns k's dims."""
    B, Hkv, cap, D = _ops.check_cache(k, "k")
    _ops.check_head_dim(D, k.device)
    _ops.check_same_dtype(v, "v", k, "k")
    _ops.check_dim(v, 4, "v", "[B, Hkv, cap, D]")
    _ops.check_device(v, "v", k, "k")
    _ops.check_same_shape(v, "v", k, "k")
    return B, Hkv, cap, D


def _check_kt(kt, ref, ref_name, B, Hkv, D, cap):
    _ops.check_same_dtype(kt, "kt", ref, ref_name)
    _ops.check_dim(kt, 4, "kt", "[B, Hkv, D, cap]")
    for d, n, what in ((0, B, "B"), (1, Hkv, "Hkv"), (2, D, "D"), (3, cap, "cap")):
        _ops.check_size(kt, d, n, "kt", what)
    _ops.check_device(kt, "kt", ref, ref_name)


def _check_f32(t, name, layout, sizes, ref, ref_name):
    """float32 t of ``layout`` with shape ``sizes`` on ref's device (v_mean, s_hat)."""
    _ops.check_dtype(t, torch.float32, name)
    _ops.check_dim(t, len(sizes), name, layout)
    for d, (n, what) in enumerate(sizes):
        _ops.check_size(t, d, n, name, what)
    _ops.check_device(t, name, ref, ref_name)


def _check_index_rows(idx, name, layout, ref, ref_name, B, H, Hkv):
    """int32 [B, Hs, n] with Hs in {H, Hkv}."""
    _ops.check_dtype(idx, torch.int32, name)
    _ops.check_dim(idx, 3, name, layout)
    _ops.check_device(idx, name, ref, ref_name)
    _ops.check_size(idx, 0, B, name, "B")
    Hs = idx.shape[1]
    torch._check_value(Hs == H or Hs == Hkv, lambda: f"kvsparse: {name}.shape[1] (Hs) must be H = {H} or "
                       f"Hkv = {Hkv}, got shape {tuple(idx.shape)}")


def _check_r(r, D):
    torch._check_value(r >= 1 and r <= D, lambda: f"kvsparse: r (the number of query channels) must be in [1, D = {D}], got {r}")


def _check_k_top(k, cap, name):
    torch._check_value(k >= 1, lambda: f"kvsparse: {name} (the number of kept positions) must be >= 1, got {k}")
    torch._check_value(k <= cap, lambda: f"kvsparse: {name} = {k} is larger than the cache (cap = {cap})")


def _check_local_window(w):
    torch._check_value(w >= 0, lambda: f"kvsparse: local_window must be >= 0, got {w}")


def _check_group_size(gs, H):
    torch._check_value(gs >= 1 and H % gs == 0,
                       lambda: f"kvsparse: group_size ({gs}) must be >= 1 and divide the number of query heads H ({H})")


@torch.library.register_fake("kvsparse::sparq_build")
def _sparq_build_fake(k, v, seq_lens):
    B, Hkv, cap, D = _check_kv_pair(k, v)
    _ops.check_lens(seq_lens, "seq_lens", B, k, "k")
    return k.new_empty((B, Hkv, D, cap)), k.new_empty((B, Hkv, D), dtype=torch.float32)


@torch.library.register_fake("kvsparse::sparq_append")
def _sparq_append_fake(k_new, v_new, k, v, kt, v_mean, seq_lens):
    B, Hkv, cap, D = _check_kv_pair(k, v)
    _ops.check_same_dtype(k_new, "k_new", k, "k")
    _ops.check_dim(k_new, 4, "k_new", "[B, Hkv, n_new, D]")
    _ops.check_device(k_new, "k_new", k, "k")
    for d, n, what in ((0, B, "B"), (1, Hkv, "Hkv"), (3, D, "D")):
        _ops.check_size(k_new, d, n, "k_new", what)
    _ops.check_same_dtype(v_new, "v_new", k, "k")
    _ops.check_dim(v_new, 4, "v_new", "[B, Hkv, n_new, D]")
    _ops.check_device(v_new, "v_new", k, "k")
    _ops.check_same_shape(v_new, "v_new", k_new, "k_new")
    _check_kt(kt, k, "k", B, Hkv, D, cap)
    _check_f32(v_mean, "v_mean", "[B, Hkv, D]", ((B, "B"), (Hkv, "Hkv"), (D, "D")), k, "k")
    _ops.check_lens(seq_lens, "seq_lens", B, k, "k")
    return None


@torch.library.register_fake("kvsparse::sparq_top_channels")
def _sparq_top_channels_fake(q, r, group_size):
    B, H, D = _ops.check_q(q)
    _ops.check_head_dim(D, q.device)
    _check_r(r, D)
    _check_group_size(group_size, H)
    return q.new_empty((B, H // group_size, r), dtype=torch.int32)


@torch.library.register_fake("kvsparse::sparq_approx_scores")
def _sparq_approx_scores_fake(q, kt, i1, seq_lens):
    B, H, D = _ops.check_q(q)
    _ops.check_head_dim(D, q.device)
    _ops.check_same_dtype(kt, "kt", q, "q")
    _ops.check_dim(kt, 4, "kt", "[B, Hkv, D, cap]")
    Hkv, cap = kt.shape[1], kt.shape[3]
    torch._check_value(Hkv >= 1, lambda: f"kvsparse: kt must have at least one KV head, got shape {tuple(kt.shape)}")
    _check_kt(kt, q, "q", B, Hkv, D, cap)
    _ops.check_gqa(H, Hkv)
    _check_index_rows(i1, "i1", "[B, Hs, r]", q, "q", B, H, Hkv)
    _check_r(i1.shape[2], D)
    _ops.check_lens(seq_lens, "seq_lens", B, q, "q")
    return q.new_empty((B, H, cap), dtype=torch.float32)


@torch.library.register_fake("kvsparse::sparq_top_positions")
def _sparq_top_positions_fake(s_hat, seq_lens, k, local_window, group_size):
    _ops.check_dtype(s_hat, torch.float32, "s_hat")
    _ops.check_dim(s_hat, 3, "s_hat", "[B, H, cap]")
    B, H, cap = s_hat.shape
    _check_k_top(k, cap, "k")
    _check_local_window(local_window)
    _check_group_size(group_size, torch.sym_max(H, 1))
    _ops.check_lens(seq_lens, "seq_lens", B, s_hat, "s_hat")
    return s_hat.new_empty((B, H // group_size, k), dtype=torch.int32)


@torch.library.register_fake("kvsparse::sparq_sparse_attention")
def _sparq_sparse_attention_fake(q, k, v, i2, s_hat, v_mean, seq_lens, scale, reallocate):
    B, H, Hkv, cap, D = _ops.check_qkv(q, k, v)
    _ops.check_lens(seq_lens, "seq_lens", B, q, "q")
    _check_index_rows(i2, "i2", "[B, Hs, n_sel]", q, "q", B, H, Hkv)
    _check_f32(s_hat, "s_hat", "[B, H, cap]", ((B, "B"), (H, "H"), (cap, "cap")), q, "q")
    _check_f32(v_mean, "v_mean", "[B, Hkv, D]", ((B, "B"), (Hkv, "Hkv"), (D, "D")), q, "q")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("kvsparse::sparq_attention")
def _sparq_attention_fake(q, k, v, kt, v_mean, seq_lens, r, k_top, local_window, group, reallocate, scale):
    B, H, Hkv, cap, D = _ops.check_qkv(q, k, v)
    _ops.check_lens(seq_lens, "seq_lens", B, q, "q")
    _check_kt(kt, q, "q", B, Hkv, D, cap)
    _check_f32(v_mean, "v_mean", "[B, Hkv, D]", ((B, "B"), (Hkv, "Hkv"), (D, "D")), q, "q")
    _check_r(r, D)
    _check_k_top(k_top, cap, "k_top")
    _check_local_window(local_window)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def check_cache(k, v, kt, v_mean, seq_lens, rtol=1e-3, atol=1e-3):
    """Check that ``kt`` and ``v_mean`` match the cache ``k``, ``v`` (a
    debugging aid: it reads the whole cache, which a decode step must not).

    The ops trust ``kt`` to be the channel-major copy of ``k`` and ``v_mean``
    the mean of ``v`` over each sequence's ``seq_lens[b]`` tokens, as
    :func:`build` and :func:`append` keep them; only their shapes, dtypes
    and devices are checked per call. A ``kt`` built from other keys gives
    wrong positions without an error. This compares them.

    Raises:
        ValueError: naming ``kt`` or ``v_mean`` and the first sequence and KV
            head that differ.
    """
    want_kt, want_mean = build(k, v, seq_lens)
    for b, n in enumerate(seq_lens.tolist()):
        for h in range(k.shape[1]):
            if not torch.allclose(kt[b, h, :, :n].float(), want_kt[b, h, :, :n].float(), rtol=rtol, atol=atol,
                                  equal_nan=True):
                raise ValueError(f"kvsparse: kt does not match k at sequence {b}, KV head {h} "
                                 "(rebuild it with sparq.build, and keep it with sparq.append)")
            if not torch.allclose(v_mean[b, h].float(), want_mean[b, h].float(), rtol=rtol, atol=atol,
                                  equal_nan=True):
                raise ValueError(f"kvsparse: v_mean does not match v at sequence {b}, KV head {h}")


# a list or NumPy array where a tensor belongs: TypeError naming it
_ops.wrap_public(globals(), __all__)
