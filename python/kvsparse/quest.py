"""Quest: query-aware page selection for sparse decode attention.

The KV cache of every sequence is cut into pages of ``page_size`` consecutive
tokens: page ``p`` holds tokens ``[p*P, min((p+1)*P, len))`` and a sequence of
length ``len`` has ``ceil(len / P)`` pages; pages past that are *empty*. For
every page Quest keeps the channel-wise minimum and maximum of the keys
(``kmin``/``kmax``). At decode time it bounds each page's attention logit by
``sum_d max(q_d * kmin_d, q_d * kmax_d)``, keeps the best pages within a token
budget (always including the last, partially filled page) and runs exact
attention over the kept tokens only.

Shapes (all tensors contiguous, on one device):

==========  =========================  =======================================
q           [B, H, D]                  decode query, float32/float16/bfloat16
k, v        [B, Hkv, cap, D]           KV cache, same dtype as q
kmin, kmax  [B, Hkv, max_pages, D]     page metadata, same dtype as k;
                                       max_pages = ceil(cap / page_size)
seq_lens    [B] int32                  valid tokens per sequence, in [0, cap]
scores      [B, Hs, max_pages] float32 Hs = Hkv ("group") or H ("head")
page_idx    [B, Hs, n_sel] int32       selected pages, ascending, -1 padded
==========  =========================  =======================================

``H`` must be a multiple of ``Hkv`` (grouped-query attention): query head ``h``
reads KV head ``h // (H // Hkv)``. Head dim ``D`` must be a multiple of 8 up to
256 on CPU, and 64, 80, 96, 128 or 256 on CUDA.

On CPU the values of ``seq_lens``/``start_lens``/``page_idx`` are validated; on
CUDA they are trusted (checking them would need a host sync and break CUDA
graphs) and the kernels clamp them.
"""
import math

import torch

from . import _ops

__all__ = [
    "page_metadata",
    "update_metadata",
    "page_scores",
    "select_pages",
    "sparse_attention",
    "attention",
    "combine_scores",
    "group_mass",
    "force_pages",
    "top_p_pages",
    "GROUP_MODES",
]

_MODES = ("group", "head")

#: How the page scores of the ``G`` query heads sharing a KV head are combined
#: into one page set per KV head (see :func:`combine_scores`).
GROUP_MODES = ("group", "max", "softmax", "softmax_max", "union")


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


def page_metadata(k, seq_lens, page_size=16):
    """Build the per-page key min/max metadata of a whole KV cache.

    Args:
        k: keys ``[B, Hkv, cap, D]``, float32/float16/bfloat16.
        seq_lens: ``[B]`` int32, valid tokens per sequence (``0 <= len <= cap``).
        page_size: tokens per page ``P`` (>= 1).

    Returns:
        ``(kmin, kmax)``, each ``[B, Hkv, ceil(cap / P), D]`` in ``k``'s dtype:
        the channel-wise min / max of ``k`` over the valid tokens of each page
        (the last page of a sequence may be partial; only tokens ``< len``
        count). Pages with no valid token (at or past ``ceil(len / P)``) are
        zeros.
    """
    return _ops.ops.quest_page_metadata(k, seq_lens, _ops.int_arg(page_size, "page_size"))


def update_metadata(k, kmin, kmax, start_lens, seq_lens, page_size=16):
    """Update ``kmin``/``kmax`` in place after tokens were appended to the cache.

    The tokens ``[start_lens[b], seq_lens[b])`` of sequence ``b`` are new.
    Only the pages they touch (from page ``start_lens[b] // P`` on) are
    recomputed from ``k``, and the empty pages after them are zeroed; earlier
    pages are left as they are. After the call ``kmin``/``kmax`` equal what
    :func:`page_metadata` would return for ``seq_lens`` (provided they were
    up to date for ``start_lens``).

    Args:
        k: keys ``[B, Hkv, cap, D]`` already holding the new tokens.
        kmin, kmax: ``[B, Hkv, ceil(cap / P), D]``, same dtype as ``k``;
            modified in place.
        start_lens: ``[B]`` int32, lengths before the append
            (``0 <= start_lens[b] <= seq_lens[b]``).
        seq_lens: ``[B]`` int32, lengths after the append (``<= cap``).
        page_size: tokens per page ``P``.

    Returns:
        None.
    """
    _ops.ops.quest_update_metadata(k, kmin, kmax, start_lens, seq_lens, _ops.int_arg(page_size, "page_size"))


def page_scores(q, kmin, kmax, seq_lens, page_size=16, mode="group"):
    """Quest upper-bound score of every page.

    ``score[b, h, p] = sum_d max(q[b,h,d] * kmin[b,hk,p,d], q[b,h,d] * kmax[b,hk,p,d])``
    with ``hk = h // (H // Hkv)``, accumulated in float32. Empty pages
    (``p >= ceil(seq_lens[b] / P)``) score ``-inf``.

    Args:
        q: query ``[B, H, D]``.
        kmin, kmax: page metadata ``[B, Hkv, max_pages, D]``, q's dtype.
        seq_lens: ``[B]`` int32 (``<= max_pages * P``).
        page_size: tokens per page ``P``.
        mode: ``"head"``: one row per query head (``Hs = H``); ``"group"``:
            one row per KV head (``Hs = Hkv``), the sum of the scores of the
            ``H // Hkv`` query heads sharing it (empty pages stay ``-inf``).

    Returns:
        float32 ``[B, Hs, max_pages]``.
    """
    return _ops.ops.quest_page_scores(q, kmin, kmax, seq_lens, _ops.int_arg(page_size, "page_size"), _group_flag(mode))


def select_pages(scores, seq_lens, page_size=16, token_budget=2048):
    """Choose the pages to attend to from their scores.

    With ``n_sel = min(token_budget // P, max_pages)`` and
    ``np = ceil(seq_lens[b] / P)``, for each row ``(b, r)``:
    if ``np <= n_sel`` all pages ``0 .. np-1`` are kept; otherwise the last
    page ``np-1`` plus the ``n_sel - 1`` highest-scoring pages among
    ``0 .. np-2`` (ties go to the lower page index).

    Args:
        scores: float32 ``[B, Hs, max_pages]`` (from :func:`page_scores`).
        seq_lens: ``[B]`` int32 (``<= max_pages * P``).
        page_size: tokens per page ``P``.
        token_budget: tokens to keep per row (>= ``page_size``).

    Returns:
        int32 ``[B, Hs, n_sel]``: kept page indices in ascending order, the
        rest of the row ``-1`` (a sequence of length 0 gives a row of ``-1``).
    """
    return _ops.ops.quest_select_pages(scores, seq_lens, _ops.int_arg(page_size, "page_size"), _ops.int_arg(token_budget, "token_budget"))


def sparse_attention(q, k, v, page_idx, seq_lens, page_size=16, scale=None):
    """Exact decode attention restricted to selected pages.

    ``out[b,h] = softmax_t(scale * q[b,h] . k[b,hk,t]) @ v[b,hk,t]`` over the
    tokens ``t`` of the pages in ``page_idx[b, r(h)]`` (``-1`` entries skipped,
    tokens ``t >= seq_lens[b]`` masked), where ``r(h) = h`` when
    ``page_idx`` has ``H`` rows and ``h // (H // Hkv)`` when it has ``Hkv``
    rows. Accumulates in float32 with a numerically stable softmax; a row
    that sees no token gives zeros.

    Args:
        q: ``[B, H, D]``.
        k, v: ``[B, Hkv, cap, D]``, q's dtype.
        page_idx: int32 ``[B, Hs, n_sel]``, ``Hs`` in ``{H, Hkv}``; each value
            ``-1`` or in ``[0, ceil(cap / P))``.
        seq_lens: ``[B]`` int32 in ``[0, cap]``.
        page_size: tokens per page ``P``.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, D]`` in q's dtype.
    """
    return _ops.ops.quest_sparse_attention(q, k, v, page_idx, seq_lens, _ops.int_arg(page_size, "page_size"), _scale(q, scale))


def attention(q, k, v, kmin, kmax, seq_lens, page_size=16, token_budget=2048, mode="group", scale=None):
    """Fused Quest decode attention: scores, selection and sparse attention.

    Same result as ``sparse_attention(q, k, v, select_pages(page_scores(q,
    kmin, kmax, seq_lens, page_size, mode), seq_lens, page_size,
    token_budget), seq_lens, page_size, scale)`` without materialising the
    intermediates. When ``token_budget >= seq_lens[b]`` every page is kept and
    the result is dense attention over the valid prefix.

    Args:
        q: ``[B, H, D]``.
        k, v: ``[B, Hkv, cap, D]``, q's dtype.
        kmin, kmax: ``[B, Hkv, ceil(cap / P), D]``, q's dtype, up to date for
            ``seq_lens`` (see :func:`page_metadata`, :func:`update_metadata`).
        seq_lens: ``[B]`` int32 in ``[0, cap]``.
        page_size: tokens per page ``P``.
        token_budget: tokens attended per row (>= ``page_size``); the number of
            pages kept is ``min(token_budget // P, ceil(cap / P))``.
        mode: ``"group"`` (one page set per KV head) or ``"head"`` (one per
            query head).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, D]`` in q's dtype.
    """
    group = _group_flag(mode)
    return _ops.ops.quest_attention(
        q, k, v, kmin, kmax, seq_lens, _ops.int_arg(page_size, "page_size"), _ops.int_arg(token_budget, "token_budget"), group, _scale(q, scale)
    )


def _head_scores_shape(scores, num_kv_heads):
    """``(B, H, max_pages, Hkv)`` of per-query-head scores ``[B, H, max_pages]``,
    checked (``Hkv`` must divide ``H``)."""
    if not torch.is_tensor(scores) or scores.dim() != 3:
        raise ValueError(f"kvsparse: scores must be a [B, H, max_pages] tensor, got "
                         f"{tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}")
    Hkv = _ops.int_arg(num_kv_heads, "num_kv_heads")
    B, H, P = scores.shape
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"kvsparse: num_kv_heads ({Hkv}) must divide the number of score rows H = {H}")
    return B, H, P, Hkv


def combine_scores(scores, num_kv_heads, how="softmax", scale=1.0):
    """One page score per KV head from per-query-head scores (GQA selection).

    Quest bounds each query head's logit per page; under grouped-query
    attention the ``G = H // Hkv`` query heads of a KV head share one page set
    (one read of the pages). How their scores are combined decides which
    pages a single head that needs them can win:

    * ``"group"``: the sum of the bounds (what ``mode="group"`` computes in
      the fused kernel). A page one head needs can lose to pages the others
      like mildly.
    * ``"max"``: the largest bound over the heads.
    * ``"softmax"``: each head's bounds are normalised into a distribution
      over the pages, ``softmax_p(scale * bound)`` (the attention mass the
      bound allows), and the distributions are summed: every head has the
      same say, whatever the scale of its logits.
    * ``"softmax_max"``: the same per-head distributions, combined by their
      maximum (a page that one head gives much of its mass wins over pages
      that every head gives a little).
    * ``"union"``: each head ranks the pages; pages are taken round-robin by
      rank (every head's best page, then every head's second, ...), i.e. the
      union of per-head top lists with the budget shared equally; ties
      between pages of the same best rank go to the larger softmax mass.

    Args:
        scores: float32 ``[B, H, max_pages]`` from
            :func:`page_scores` with ``mode="head"`` (empty pages ``-inf``).
        num_kv_heads: ``Hkv`` (must divide ``H``).
        how: one of :data:`GROUP_MODES`.
        scale: the logit scale (``"softmax"``, ``"union"``).

    Returns:
        float32 ``[B, Hkv, max_pages]`` for :func:`select_pages` (higher is
        better; empty pages stay ``-inf``).
    """
    B, H, P, Hkv = _head_scores_shape(scores, num_kv_heads)
    if how not in GROUP_MODES:
        raise ValueError(f"kvsparse: how must be one of {GROUP_MODES}, got {how!r}")
    s = scores.float().view(B, Hkv, H // Hkv, P)
    empty = torch.isneginf(s[:, :, 0])  # empty pages are -inf in every head
    if how == "group":
        return s.sum(2)
    if how == "max":
        return s.amax(2)
    # softmax over the pages, in place on one scaled copy (a decode step allocates
    # little beyond the scores themselves); a NaN bound stays on its page (NaN
    # policy: the page is then selected first) instead of spoiling the head's row
    nan = torch.isnan(s)
    prob = s * float(scale)
    prob.masked_fill_(nan, float("-inf"))
    prob.sub_(prob.amax(-1, keepdim=True)).exp_()
    prob.div_(prob.sum(-1, keepdim=True))
    if how == "softmax":
        out = prob.sum(2)
    elif how == "softmax_max":
        out = prob.amax(2)
    else:  # union: round-robin by per-head rank
        order = s.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(P, device=s.device).expand_as(order))
        best = rank.amin(2).float()
        out = -best + 0.5 * prob.amax(2)
    out.masked_fill_(nan.any(2), float("nan"))
    return out.masked_fill_(empty, float("-inf"))



def group_mass(scores, num_kv_heads, scale=1.0):
    """Each KV head's estimated attention mass per page: the mean over its
    ``G`` query heads of ``softmax_p(scale * bound)``.

    Args:
        scores: float32 ``[B, H, max_pages]`` from :func:`page_scores` with
            ``mode="head"`` (empty pages ``-inf``).
        num_kv_heads: ``Hkv`` (must divide ``H``).
        scale: the logit scale.

    Returns:
        float32 ``[B, Hkv, max_pages]``; each row sums to 1 over its non-empty
        pages (0 on empty pages). A NaN bound gives NaN mass in its row.
    """
    B, H, P, Hkv = _head_scores_shape(scores, num_kv_heads)
    prob = scores.float() * float(scale)
    prob = torch.softmax(prob, dim=-1)
    return prob.view(B, Hkv, H // Hkv, P).mean(2)


def _forced(n_pages, seq_lens, page_size, sink_pages, recent_pages, device):
    """bool ``[B, n_pages]``: the sink pages (``0 .. sink-1``) and the last
    ``recent`` non-empty pages of each sequence (a few bytes per page)."""
    p = torch.arange(n_pages, device=device, dtype=torch.int32)
    used = (seq_lens.to(device=device, dtype=torch.int32) + (page_size - 1)).div_(page_size, rounding_mode="floor")
    used = used.unsqueeze(1)
    # page p is kept when p < min(sink, used) or used - recent <= p < used
    lo = (used - recent_pages).clamp_(min=0) if recent_pages > 0 else used
    keep = p >= lo
    keep &= p < used
    if sink_pages > 0:
        keep |= p < torch.clamp(used, max=sink_pages)
    return keep


def force_pages(scores, seq_lens, page_size=16, sink_pages=0, recent_pages=1, inplace=False):
    """Scores with the always-kept pages set to ``+inf``, so that
    :func:`select_pages` takes them first (inside the budget).

    The always-kept pages of sequence ``b`` are the first ``sink_pages``
    (attention sinks) and the last ``recent_pages`` non-empty ones (the recent
    window; :func:`select_pages` keeps the last page in any case). Empty
    pages stay as they are.

    Args:
        scores: float32 ``[B, Hs, max_pages]``.
        seq_lens: ``[B]`` int32.
        page_size: tokens per page ``P``.
        sink_pages, recent_pages: ints >= 0.
        inplace: write into ``scores`` (a decode step's own scores: no copy).

    Returns:
        float32 ``[B, Hs, max_pages]``: a new tensor, or ``scores`` itself
        when ``inplace``.
    """
    sink = _ops.int_arg(sink_pages, "sink_pages")
    recent = _ops.int_arg(recent_pages, "recent_pages")
    P = _ops.int_arg(page_size, "page_size")
    if sink < 0 or recent < 0:
        raise ValueError(f"kvsparse: sink_pages ({sink}) and recent_pages ({recent}) must be >= 0")
    if P < 1:
        raise ValueError(f"kvsparse: page_size must be >= 1, got {P}")
    keep = _forced(scores.shape[-1], seq_lens, P, sink, recent, scores.device).unsqueeze(1)
    if inplace:
        return scores.masked_fill_(keep, float("inf"))
    return scores.masked_fill(keep, float("inf"))


def top_p_pages(page_idx, mass, seq_lens, page_size=16, top_p=0.9, sink_pages=0, recent_pages=1):
    """An adaptive budget: of the selected pages, keep the fewest whose
    estimated attention mass reaches ``top_p``; the rest of the row becomes
    ``-1`` (skipped by :func:`sparse_attention`). The always-kept pages (see
    :func:`force_pages`) stay and count first; then pages in decreasing mass.
    The row keeps its length (the token budget is the cap), so nothing
    depends on the data's shape and no host sync is needed.

    Args:
        page_idx: int32 ``[B, Hs, n_sel]`` from :func:`select_pages`.
        mass: float32 ``[B, Hs, max_pages]``, e.g. :func:`group_mass` (each row
            sums to 1).
        seq_lens: ``[B]`` int32.
        page_size: tokens per page ``P``.
        top_p: the mass to reach, in ``(0, 1]``.
        sink_pages, recent_pages: as in :func:`force_pages`.

    Returns:
        int32 ``[B, Hs, n_sel]``, the kept pages in their original order.
    """
    p = _ops.float_arg(top_p, "top_p")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"kvsparse: top_p must be in (0, 1], got {p}")
    valid = page_idx >= 0
    safe = page_idx.clamp(min=0).long()
    m = torch.gather(mass, -1, safe).masked_fill(~valid, 0.0)
    keep = _forced(mass.shape[-1], seq_lens, _ops.int_arg(page_size, "page_size"),
                   _ops.int_arg(sink_pages, "sink_pages"), _ops.int_arg(recent_pages, "recent_pages"),
                   mass.device)  # [B, max_pages]
    forced = torch.gather(keep.unsqueeze(1).expand(-1, page_idx.shape[1], -1), -1, safe) & valid
    # order: forced pages first, then by mass; keep while the mass before an entry is < p
    key = torch.where(forced, torch.full_like(m, 2.0), m).masked_fill(~valid, -1.0)
    order = key.argsort(dim=-1, descending=True, stable=True)
    m_sorted = torch.gather(m, -1, order)
    before = m_sorted.cumsum(-1) - m_sorted
    keep_sorted = before < p
    keep_sorted[..., 0] = True  # the best page always (a NaN mass keeps a page too)
    kept = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept |= forced
    return torch.where(kept & valid, page_idx, torch.full_like(page_idx, -1))


# ---- fake kernels --------------------------------------------------------------
# Output shapes and dtypes for FakeTensor / torch.compile / torch.export, with
# the structural checks of csrc/ops/quest.cpp (values, contiguity and the
# CUDA-only limits are left to the real op).


def _check_page_size(page_size):
    torch._check_value(page_size >= 1 and page_size <= _ops._INT32_MAX,
                       lambda: f"kvsparse: page_size must be in [1, 2^31 - 1], got {page_size}")


def _check_token_budget(token_budget, page_size):
    torch._check_value(token_budget >= page_size,
                       lambda: f"kvsparse: token_budget ({token_budget}) must be >= page_size ({page_size})")


def _check_meta(m, name, ref, ref_name, B, Hkv, D):
    """kmin/kmax [B, Hkv, max_pages, D] of ref's dtype and device."""
    _ops.check_same_dtype(m, name, ref, ref_name)
    _ops.check_dim(m, 4, name, "[B, Hkv, max_pages, D]")
    _ops.check_size(m, 0, B, name, "B")
    _ops.check_size(m, 1, Hkv, name, "Hkv")
    _ops.check_size(m, 3, D, name, "D")
    _ops.check_device(m, name, ref, ref_name)


@torch.library.register_fake("kvsparse::quest_page_metadata")
def _page_metadata_fake(k, seq_lens, page_size):
    B, Hkv, cap, D = _ops.check_cache(k, "k")
    _ops.check_head_dim(D, k.device)
    _check_page_size(page_size)
    _ops.check_lens(seq_lens, "seq_lens", B, k, "k")
    max_pages = _ops.ceil_div(cap, page_size)
    kmin = k.new_empty((B, Hkv, max_pages, D))
    kmax = k.new_empty((B, Hkv, max_pages, D))
    return kmin, kmax


@torch.library.register_fake("kvsparse::quest_update_metadata")
def _update_metadata_fake(k, kmin, kmax, start_lens, seq_lens, page_size):
    B, Hkv, cap, D = _ops.check_cache(k, "k")
    _ops.check_head_dim(D, k.device)
    _check_page_size(page_size)
    _ops.check_lens(seq_lens, "seq_lens", B, k, "k")
    max_pages = _ops.ceil_div(cap, page_size)
    for m, name in ((kmin, "kmin"), (kmax, "kmax")):
        _check_meta(m, name, k, "k", B, Hkv, D)
        _ops.check_size(m, 2, max_pages, name, "max_pages = ceil(cap / page_size)")
    _ops.check_lens(start_lens, "start_lens", B, k, "k")
    return None


@torch.library.register_fake("kvsparse::quest_page_scores")
def _page_scores_fake(q, kmin, kmax, seq_lens, page_size, group):
    B, H, D = _ops.check_q(q)
    _ops.check_head_dim(D, q.device)
    _check_page_size(page_size)
    _ops.check_dim(kmin, 4, "kmin", "[B, Hkv, max_pages, D]")
    Hkv, max_pages = kmin.shape[1], kmin.shape[2]
    torch._check_value(Hkv >= 1, lambda: f"kvsparse: kmin must have at least one KV head, got shape {tuple(kmin.shape)}")
    _check_meta(kmin, "kmin", q, "q", B, Hkv, D)
    _check_meta(kmax, "kmax", q, "q", B, Hkv, D)
    _ops.check_size(kmax, 2, max_pages, "kmax", "max_pages, as kmin")
    _ops.check_gqa(H, Hkv)
    _ops.check_lens(seq_lens, "seq_lens", B, q, "q")
    Hs = Hkv if group else H
    return q.new_empty((B, Hs, max_pages), dtype=torch.float32)


@torch.library.register_fake("kvsparse::quest_select_pages")
def _select_pages_fake(scores, seq_lens, page_size, token_budget):
    _ops.check_dtype(scores, torch.float32, "scores")
    _ops.check_dim(scores, 3, "scores", "[B, Hs, max_pages]")
    _check_page_size(page_size)
    _check_token_budget(token_budget, page_size)
    B, Hs, max_pages = scores.shape
    _ops.check_lens(seq_lens, "seq_lens", B, scores, "scores")
    n_sel = torch.sym_min(token_budget // page_size, max_pages)
    return scores.new_empty((B, Hs, n_sel), dtype=torch.int32)


@torch.library.register_fake("kvsparse::quest_sparse_attention")
def _sparse_attention_fake(q, k, v, page_idx, seq_lens, page_size, scale):
    B, H, Hkv, cap, D = _ops.check_qkv(q, k, v)
    _check_page_size(page_size)
    _ops.check_lens(seq_lens, "seq_lens", B, q, "q")
    _ops.check_dtype(page_idx, torch.int32, "page_idx")
    _ops.check_dim(page_idx, 3, "page_idx", "[B, Hs, n_sel]")
    _ops.check_device(page_idx, "page_idx", q, "q")
    _ops.check_size(page_idx, 0, B, "page_idx", "B")
    Hs = page_idx.shape[1]
    torch._check_value(Hs == H or Hs == Hkv, lambda: f"kvsparse: page_idx.shape[1] (Hs) must be H = {H} (head mode) "
                       f"or Hkv = {Hkv} (group mode), got shape {tuple(page_idx.shape)}")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("kvsparse::quest_attention")
def _attention_fake(q, k, v, kmin, kmax, seq_lens, page_size, token_budget, group, scale):
    B, H, Hkv, cap, D = _ops.check_qkv(q, k, v)
    _check_page_size(page_size)
    _ops.check_lens(seq_lens, "seq_lens", B, q, "q")
    _check_token_budget(token_budget, page_size)
    max_pages = _ops.ceil_div(cap, page_size)
    for m, name in ((kmin, "kmin"), (kmax, "kmax")):
        _check_meta(m, name, q, "q", B, Hkv, D)
        _ops.check_size(m, 2, max_pages, name, "max_pages = ceil(cap / page_size)")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# a list or NumPy array where a tensor belongs: TypeError naming it
_ops.wrap_public(globals(), __all__)
