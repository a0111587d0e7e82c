"""Plain-PyTorch float64 reference of Quest ("plain-PyTorch Quest").

Slow but simple and vectorized over tokens; used by the tests and as a
baseline in benchmarks. Every function accepts inputs of any float dtype on
any device and computes in float64 on that device. Integer outputs are int32
(like the kernels); float outputs are float64.

Shapes follow :mod:`kvsparse.quest`: q [B,H,D]; k, v [B,Hkv,cap,D];
kmin, kmax [B,Hkv,max_pages,D]; seq_lens [B] int32; scores [B,Hs,max_pages];
page_idx [B,Hs,n_sel] (ascending, -1 padded).
"""
import math

import torch

__all__ = [
    "quest_page_metadata_ref",
    "quest_scores_ref",
    "quest_select_ref",
    "quest_sparse_attention_ref",
    "quest_attention_ref",
    "dense_attention_ref",
    "qaq_bits_ref",
    "qaq_quantize_group_ref",
    "qaq_outlier_order_ref",
    "qaq_range_ref",
    "qaq_unpack_codes_ref",
    "qaq_dequantize_ref",
    "qaq_attention_ref",
]


def _n_pages(seq_lens, page_size):
    return (seq_lens.long() + page_size - 1) // page_size


def quest_page_metadata_ref(k, seq_lens, page_size):
    """Per-page channel-wise min / max of k over valid tokens; empty pages are 0.

    Returns (kmin, kmax), float64 [B, Hkv, ceil(cap / P), D].
    """
    B, Hkv, cap, D = k.shape
    P = int(page_size)
    mp = (cap + P - 1) // P
    kd = k.double()
    pad = mp * P - cap
    if pad:
        kd = torch.cat([kd, kd.new_zeros(B, Hkv, pad, D)], dim=2)
    kd = kd.view(B, Hkv, mp, P, D)
    t = torch.arange(mp * P, device=k.device).view(mp, P)
    valid = t[None] < seq_lens.long().to(k.device)[:, None, None]  # [B, mp, P]
    valid = valid[:, None, :, :, None]  # [B,1,mp,P,1]
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=k.device)
    kmin = torch.where(valid, kd, inf).amin(dim=3)
    kmax = torch.where(valid, kd, -inf).amax(dim=3)
    page_ok = (torch.arange(mp, device=k.device)[None] < _n_pages(seq_lens, P).to(k.device)[:, None])
    page_ok = page_ok[:, None, :, None]  # [B,1,mp,1]
    kmin = torch.where(page_ok, kmin, torch.zeros_like(kmin))
    kmax = torch.where(page_ok, kmax, torch.zeros_like(kmax))
    return kmin, kmax


def quest_scores_ref(q, kmin, kmax, seq_lens, page_size, group):
    """Quest page scores, float64 [B, Hs, max_pages]; -inf for empty pages.

    group=True: Hs = Hkv, sum over the query heads of each KV head.
    """
    B, H, D = q.shape
    Hkv, mp = kmin.shape[1], kmin.shape[2]
    G = H // Hkv
    qd = q.double()[:, :, None, :]  # [B,H,1,D]
    lo = kmin.double().repeat_interleave(G, dim=1)  # [B,H,mp,D]
    hi = kmax.double().repeat_interleave(G, dim=1)
    s = torch.maximum(qd * lo, qd * hi).sum(-1)  # [B,H,mp]
    if group:
        s = s.view(B, Hkv, G, mp).sum(2)
    empty = torch.arange(mp, device=q.device)[None] >= _n_pages(seq_lens, page_size).to(q.device)[:, None]
    return s.masked_fill(empty[:, None, :], float("-inf"))


def quest_select_ref(scores, seq_lens, page_size, token_budget):
    """Quest page selection, int32 [B, Hs, n_sel], n_sel = min(budget // P, max_pages).

    Keeps all pages if they fit, else the last page plus the n_sel - 1 best of
    the others (ties to the lower index); ascending, padded with -1.
    """
    B, Hs, mp = scores.shape
    P = int(page_size)
    n_sel = min(int(token_budget) // P, mp)
    out = torch.full((B, Hs, n_sel), -1, dtype=torch.int32, device=scores.device)
    npg = _n_pages(seq_lens, P).tolist()
    for b in range(B):
        n = npg[b]
        if n == 0 or n_sel == 0:
            continue
        if n <= n_sel:
            out[b, :, :n] = torch.arange(n, dtype=torch.int32, device=scores.device)
            continue
        # NaN ranks as +inf (ties with +inf to the lower index), as the kernels
        s = torch.nan_to_num(scores[b, :, : n - 1].double(), nan=float("inf"))
        # stable descending sort keeps equal scores in ascending index order
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, : n_sel - 1]
        last = torch.full((Hs, 1), n - 1, dtype=order.dtype, device=scores.device)
        sel = torch.sort(torch.cat([order, last], dim=1), dim=-1).values
        out[b] = sel.to(torch.int32)
    return out


def quest_sparse_attention_ref(q, k, v, page_idx, seq_lens, page_size, scale=None):
    """Attention over the tokens of the listed pages (t < seq_lens), float64 [B, H, D].

    page_idx has Hs = H rows (one per query head) or Hkv rows (one per KV
    head). Rows with no token give zeros.
    """
    B, H, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    G = H // Hkv
    P = int(page_size)
    mp = (cap + P - 1) // P
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    Hs = page_idx.shape[1]
    dev = q.device
    pi = page_idx.long().to(dev)
    pi = torch.where(pi < 0, torch.full_like(pi, mp), pi)  # -1 -> dummy slot mp
    page_mask = torch.zeros(B, Hs, mp + 1, dtype=torch.bool, device=dev)
    page_mask.scatter_(2, pi, True)
    t = torch.arange(cap, device=dev)
    tok = page_mask[:, :, t // P] & (t[None, None] < seq_lens.long().to(dev)[:, None, None])  # [B,Hs,cap]
    if Hs != H:
        tok = tok.repeat_interleave(G, dim=1)
    kd = k.double().repeat_interleave(G, dim=1)  # [B,H,cap,D]
    vd = v.double().repeat_interleave(G, dim=1)
    logits = torch.einsum("bhd,bhtd->bht", q.double(), kd) * float(scale)
    logits = logits.masked_fill(~tok, float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bht,bhtd->bhd", p, vd)


def quest_attention_ref(q, k, v, kmin, kmax, seq_lens, page_size, token_budget, group=True,
                        scale=None, scores=None):
    """Fused Quest decode reference: scores -> selection -> sparse attention.

    ``scores`` may be given (e.g. the kernel's own float32 scores) to make the
    page choice independent of float rounding in near-ties; otherwise they
    are computed in float64 from kmin/kmax. Returns float64 [B, H, D].
    """
    if scores is None:
        scores = quest_scores_ref(q, kmin, kmax, seq_lens, page_size, group)
    idx = quest_select_ref(scores, seq_lens, page_size, token_budget)
    return quest_sparse_attention_ref(q, k, v, idx, seq_lens, page_size, scale)


def dense_attention_ref(q, k, v, seq_lens, scale=None):
    """Dense decode attention over the valid prefix of every sequence, float64 [B, H, D]."""
    B, H, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    P = max(cap, 1)
    mp = 1
    idx = torch.zeros(B, Hkv, mp, dtype=torch.int32, device=q.device)
    return quest_sparse_attention_ref(q, k, v, idx, seq_lens, P, scale)


# ---------------------------------------------------------------------------
# SparQ (see kvsparse.sparq). Shapes: kt [B,Hkv,D,cap]; v_mean [B,Hkv,D];
# i1 [B,Hs,r] (ascending); s_hat [B,H,cap]; i2 [B,Hs,k] (ascending, -1 padded).
# Selections (top channels / top positions) order their keys exactly like the
# kernels: group sums are taken in the input's dtype (float32 for the kernels'
# outputs) in head order, NaN ranks as +inf, ties go to the lower index.

__all__ += [
    "sparq_build_ref",
    "sparq_top_channels_ref",
    "sparq_approx_scores_ref",
    "sparq_top_positions_ref",
    "sparq_sparse_attention_ref",
    "sparq_attention_ref",
]


def _valid_tokens(seq_lens, cap, device):
    """bool [B, cap]: t < seq_lens[b]."""
    return torch.arange(cap, device=device)[None] < seq_lens.long().to(device)[:, None]


def _group_sum(x, group_size):
    """[B, H, n] -> [B, H // group_size, n]: sum of each group's rows in x's dtype, in head order."""
    B, H, n = x.shape
    xs = x.reshape(B, H // group_size, group_size, n)
    out = xs[:, :, 0].clone()
    for g in range(1, group_size):
        out = out + xs[:, :, g]
    return out


def sparq_build_ref(k, v, seq_lens):
    """(kt, v_mean): kt = k transposed [B,Hkv,D,cap] (float64); v_mean float64 [B,Hkv,D],
    the mean of v over t < seq_lens[b] (zeros for an empty sequence)."""
    B, Hkv, cap, D = k.shape
    kt = k.double().transpose(2, 3).contiguous()
    valid = _valid_tokens(seq_lens, cap, v.device)[:, None, :, None]
    vd = torch.where(valid, v.double(), torch.zeros((), dtype=torch.float64, device=v.device))
    n = seq_lens.long().to(v.device).clamp(min=1).double()[:, None, None]
    return kt, vd.sum(2) / n


def sparq_top_channels_ref(q, r, group_size=1):
    """int32 [B, H // group_size, r]: the r channels of largest sum_g |q| (float32, head
    order, like the kernels), ties to the lower channel, in ascending order."""
    key = _group_sum(q.float().abs(), int(group_size))
    key = torch.nan_to_num(key, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., : int(r)]
    return torch.sort(order, dim=-1).values.to(torch.int32)


def sparq_approx_scores_ref(q, k, i1, seq_lens):
    """float64 [B, H, cap]: softmax over t < len of q[i1] . K[t, i1] / tau, 0 past len.

    Reads K[:, i1] from the row-major cache k [B,Hkv,cap,D] (the kernels read kt).
    tau = sqrt(D * ||q[i1]||_1 / ||q||_1) per query head.
    """
    B, H, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    G = H // Hkv
    idx = i1.long().to(q.device)
    if idx.shape[1] != H:
        idx = idx.repeat_interleave(G, dim=1)  # [B,H,r]
    r = idx.shape[-1]
    qd = q.double()
    qs = qd.gather(-1, idx)  # [B,H,r]
    l1 = qd.abs().sum(-1)
    l1s = qs.abs().sum(-1)
    pos = l1s > 0
    inv_tau = torch.where(pos, 1.0 / torch.sqrt(D * l1s / torch.where(pos, l1, torch.ones_like(l1))),
                          torch.zeros_like(l1s))
    valid = _valid_tokens(seq_lens, cap, q.device)[:, None, :]  # [B,1,cap]
    kd = torch.where(valid[..., None], k.double(), torch.zeros((), dtype=torch.float64, device=q.device))
    # K[:, i1] per query head without materialising K per query head
    ksel = kd[:, :, None].expand(B, Hkv, G, cap, D).gather(
        -1, idx.view(B, Hkv, G, 1, r).expand(B, Hkv, G, cap, r))  # [B,Hkv,G,cap,r]
    z = torch.einsum("bkgr,bkgtr->bkgt", qs.view(B, Hkv, G, r), ksel).reshape(B, H, cap)
    z = z * inv_tau[..., None]
    z = z.masked_fill(~valid, float("-inf"))
    m = z.amax(-1, keepdim=True) if cap > 0 else z.new_zeros(B, H, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(z - m)
    den = p.sum(-1, keepdim=True)
    return p / torch.where(den > 0, den, torch.ones_like(den))


def sparq_top_positions_ref(s_hat, seq_lens, k, local_window=0, group_size=1):
    """int32 [B, H // group_size, k]: all positions if k >= len, else the last
    w = min(local_window, k) positions plus the k - w best of 0..len-w-1 (key: the
    group's s_hat summed in s_hat's dtype, head order; ties to the lower position);
    ascending, -1 padded."""
    B, H, cap = s_hat.shape
    gs = int(group_size)
    k = int(k)
    key = _group_sum(s_hat, gs)
    key = torch.nan_to_num(key, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    Hs = H // gs
    dev = s_hat.device
    out = torch.full((B, Hs, k), -1, dtype=torch.int32, device=dev)
    for b, L in enumerate(seq_lens.long().tolist()):
        L = max(0, min(L, cap))
        if k >= L:
            out[b, :, :L] = torch.arange(L, dtype=torch.int32, device=dev)
            continue
        w = min(int(local_window), k)
        m, kk = L - w, k - w
        parts = []
        if kk > 0:
            parts.append(torch.sort(key[b, :, :m], dim=-1, descending=True, stable=True).indices[:, :kk])
        parts.append(torch.arange(m, L, device=dev)[None].expand(Hs, w))
        sel = torch.sort(torch.cat(parts, dim=1), dim=-1).values
        out[b] = sel.to(torch.int32)
    return out


def sparq_sparse_attention_ref(q, k, v, i2, s_hat, v_mean, seq_lens, scale=None, reallocate=True):
    """float64 [B, H, D]: attention over the (distinct) positions of i2 that are < len,
    then alpha * y + (1 - alpha) * v_mean with alpha = sum of s_hat over them
    (reallocate=False: y). A row with no position gives y = 0."""
    B, H, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    G = H // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    dev = q.device
    Hs = i2.shape[1]
    idx = i2.long().to(dev)
    idx = torch.where(idx < 0, torch.full_like(idx, cap), idx)
    tok = torch.zeros(B, Hs, cap + 1, dtype=torch.bool, device=dev)
    tok.scatter_(2, idx, True)
    tok = tok[:, :, :cap] & _valid_tokens(seq_lens, cap, dev)[:, None, :]
    if Hs != H:
        tok = tok.repeat_interleave(G, dim=1)  # [B,H,cap]
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    valid = _valid_tokens(seq_lens, cap, dev)[:, None, :, None]  # [B,1,cap,1]
    kd = torch.where(valid, k.double(), zero)  # the cache tail may hold NaN / inf
    vd = torch.where(valid, v.double(), zero)
    logits = torch.einsum("bkgd,bktd->bkgt", q.double().view(B, Hkv, G, D), kd).reshape(B, H, cap)
    logits = logits * float(scale)
    logits = logits.masked_fill(~tok, float("-inf"))
    m = logits.amax(-1, keepdim=True) if cap > 0 else logits.new_zeros(B, H, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m)
    den = p.sum(-1, keepdim=True)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    y = torch.einsum("bkgt,bktd->bkgd", p.view(B, Hkv, G, cap), vd).reshape(B, H, D)
    if not reallocate:
        return y
    alpha = torch.where(tok, s_hat.double().to(dev), zero).sum(-1, keepdim=True)  # [B,H,1]
    vm = v_mean.double().to(dev).repeat_interleave(G, dim=1)  # [B,H,D]
    return alpha * y + (1.0 - alpha) * vm


def sparq_attention_ref(q, k, v, seq_lens, r, k_top, local_window=0, group=True, reallocate=True,
                        scale=None, v_mean=None, s_hat=None):
    """Fused SparQ decode reference: top channels -> approx scores -> top positions ->
    sparse attention (+ reallocation). float64 [B, H, D].

    ``s_hat`` may be given (e.g. the kernels' own float32 scores) so that the
    position choice does not depend on float rounding in near-ties; otherwise
    it is computed in float64. ``v_mean`` defaults to the float64 mean of v.
    """
    H, Hkv = q.shape[1], k.shape[1]
    gs = H // Hkv if group else 1
    if v_mean is None:
        v_mean = sparq_build_ref(k, v, seq_lens)[1]
    if s_hat is None:
        i1 = sparq_top_channels_ref(q, r, gs)
        s_hat = sparq_approx_scores_ref(q, k, i1, seq_lens)
    i2 = sparq_top_positions_ref(s_hat, seq_lens, k_top, local_window, gs)
    return sparq_sparse_attention_ref(q, k, v, i2, s_hat, v_mean, seq_lens, scale, reallocate)


# ---- QAQ ------------------------------------------------------------------------
# Code decisions (outliers, scale, zero, codes) replicate the kernels' float32
# arithmetic exactly, so that codes compare equal; dequantized values and
# attention are float64.


def qaq_bits_ref(rng, aux, seq_lens, sigma, allowed, n_recent, is_key):
    """The paper's bit-width bounds in float64 (IEEE inf / nan semantics).

    rng [B, Hg, cap]; aux = q_sq [B, Hg] (keys) or s_max [B, Hg, cap] (values).
    Returns int32 [B, Hg, cap].
    """
    allowed = sorted(int(w) for w in allowed)
    B, Hg, cap = rng.shape
    T = seq_lens.cpu().double()[:, None, None]
    r = rng.double().cpu()
    if is_key:
        sig = torch.sqrt(torch.log(T**3 / (T - 1) * sigma**2 + 1) / aux.double().cpu()[:, :, None])
    else:
        sig = sigma / (torch.sqrt(T) * aux.double().cpu())
    bt = torch.ceil(torch.log2(r / (2 * math.sqrt(3) * sig)))
    w = torch.full(bt.shape, allowed[-1], dtype=torch.int32)
    for c in reversed(allowed):
        w = torch.where(c >= bt, torch.full_like(w, c), w)
    t = torch.arange(cap)[None, None, :]
    w = torch.where(t >= T - n_recent, torch.full_like(w, allowed[-1]), w)
    return torch.where(t >= T, torch.zeros_like(w), w)


def qaq_outlier_order_ref(x, high, skip=None):
    """The ranking of one outlier pass over groups ``x [..., E]`` (qaq.h): indices
    sorted ascending (``high=False``) or descending (``high=True``), NaN first in
    both, ties (equal values, -0 and +0, NaNs among themselves) to the lower
    index, elements marked in ``skip`` (bool [..., E]) last."""
    xf = x.float()
    nan = xf.isnan()
    v = torch.where(nan | (xf == 0), torch.zeros_like(xf), xf)  # -0 ties with +0
    order = torch.sort(-v if high else v, dim=-1, stable=True).indices
    cls = torch.where(nan, 0, 1)
    if skip is not None:
        cls = torch.where(skip, 2, cls)
    return order.gather(-1, torch.sort(cls.gather(-1, order), dim=-1, stable=True).indices)


def qaq_range_ref(x, out_mask, w):
    """(scale, zero) float16 [...] of groups ``x [..., E]`` (float32 values) at width
    ``w`` (int tensor [...]) with the elements in ``out_mask`` excluded (qaq.h):
    min / max over the others, -0 below +0, NaN if one of them is NaN (stored as
    the fp16 NaN 0x7e00)."""
    xf = x.float()
    inf = torch.tensor(float("inf"))
    mn = torch.where(out_mask, inf, xf).amin(-1)  # amin / amax propagate NaN
    mx = torch.where(out_mask, -inf, xf).amax(-1)
    zero = ~out_mask & (xf == 0)
    neg0 = (zero & xf.signbit()).any(-1)
    pos0 = (zero & ~xf.signbit()).any(-1)
    mn = torch.where(mn == 0, torch.where(neg0, -0.0, 0.0), mn)
    mx = torch.where(mx == 0, torch.where(pos0, 0.0, -0.0), mx)
    steps = torch.where(w > 0, (1 << w) - 1, torch.ones_like(w)).float()
    s = torch.where(w > 0, (mx - mn) / steps, mx - mn)
    hnan = torch.tensor(0x7E00, dtype=torch.int16).view(torch.float16)
    return torch.where(s.isnan(), hnan, s.half()), torch.where(mn.isnan(), hnan, mn.half())


def qaq_quantize_group_ref(x, w, n_out):
    """Quantize groups ``x [..., E]`` (any float dtype, values of the cache dtype) at
    width ``w`` (int, or int tensor [...]) with ``n_out`` outlier slots (qaq.h's
    rule: the ``n_out / 2`` lowest, then the ``n_out / 2`` highest of the others,
    NaN ranking first in both passes; a NaN inlier makes the range NaN, stored as
    the fp16 NaN 0x7e00; -0 counts below +0 in the range).

    Returns (codes int64 [..., E], sz float16 [..., 2], oidx int16 [..., n_out],
    oval [..., n_out] in x's dtype).
    """
    E = x.shape[-1]
    n_side = n_out // 2
    xf = x.float()
    lead = x.shape[:-1]
    w = torch.as_tensor(w, dtype=torch.int64).expand(lead) if not torch.is_tensor(w) else w.long().expand(lead)
    asc = qaq_outlier_order_ref(x, False)[..., :n_side]
    low = torch.zeros(xf.shape, dtype=torch.bool).scatter_(-1, asc, True)
    desc = qaq_outlier_order_ref(x, True, low)[..., :n_side]
    oidx = torch.cat([asc, desc], -1)
    out_mask = low.scatter(-1, desc, True)
    s16, z16 = qaq_range_ref(xf, out_mask, w)
    steps = torch.where(w > 0, (1 << w) - 1, torch.ones_like(w)).float()
    sf, zf = s16.float()[..., None], z16.float()[..., None]
    u = torch.floor((xf - zf) / sf + 0.5)
    u = torch.where(sf > 0, u, torch.zeros_like(u))
    u = torch.nan_to_num(u, nan=0.0).clamp_min(0)
    codes = torch.minimum(u, steps[..., None]).long()
    codes = torch.where((w[..., None] > 0) & ~out_mask, codes, torch.zeros_like(codes))
    iv = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    oval = x.view(iv).gather(-1, oidx).view(x.dtype)  # the bits (torch's float gather may alter NaNs)
    return codes, torch.stack([s16, z16], -1), oidx.to(torch.int16), oval


def qaq_code_bit_ref(e, w, E):
    """Bit position of element e's code in a group of E elements at width w: the
    group's bytes are 32-bit little-endian words of n = 32 / w codes; in a whole
    word element i sits at slot i // 2 + (i % 2) * n / 2 (even elements in the low
    half-word, odd in the high), in a final partial word at slot i."""
    n = 32 // w
    j, i = e // n, e % n
    slot = torch.where((j + 1) * n <= E, i // 2 + (i % 2) * (n // 2), i)
    return j * 32 + slot * w


def qaq_unpack_codes_ref(arena, offsets, widths, group_elems):
    """Codes of every group read from the arena (int64 [B, Hg, cap, E]; 0 for width 0)."""
    arena, offsets, widths = arena.cpu(), offsets.cpu().long(), widths.cpu().long()
    B, Hg, cap = offsets.shape
    E = group_elems
    codes = torch.zeros(B, Hg, cap, E, dtype=torch.int64)
    e = torch.arange(E)
    for w in (1, 2, 4, 8):
        sel = widths == w
        if not sel.any():
            continue
        bidx = torch.arange(B)[:, None, None].expand(B, Hg, cap)[sel]
        bit = qaq_code_bit_ref(e, w, E)
        byte = offsets[sel][:, None] + (bit // 8)[None]
        val = arena[bidx[:, None], byte].long()
        codes[sel] = (val >> (bit % 8)[None]) & ((1 << w) - 1)
    return codes


def qaq_dequantize_ref(arena, offsets, widths, sz, oidx, oval, seq_lens, num_kv_heads, head_dim):
    """float64 [B, Hkv, cap, D] from a quantized cache (zeros past seq_lens)."""
    B, Hg, cap = offsets.shape
    E = head_dim * (num_kv_heads // Hg)
    codes = qaq_unpack_codes_ref(arena, offsets, widths, E).double()
    w = widths.cpu().long()[..., None]
    s = sz.cpu()[..., 0].float().double()[..., None]
    z = sz.cpu()[..., 1].float().double()[..., None]
    x = torch.where(w > 0, z + s * codes, z + s * 0.5)
    oi = oidx.cpu().long()
    ok = (oi >= 0) & (oi < E)
    x.scatter_(-1, oi.clamp(0, E - 1), torch.where(ok, oval.cpu().double(), torch.gather(x, -1, oi.clamp(0, E - 1))))
    x = x.view(B, Hg, cap, num_kv_heads // Hg, head_dim).permute(0, 1, 3, 2, 4).reshape(B, num_kv_heads, cap, head_dim)
    valid = torch.arange(cap)[None, None, :, None] < seq_lens.cpu().long()[:, None, None, None]
    return torch.where(valid, x, torch.zeros_like(x))


def qaq_attention_ref(q, kd, vd, seq_lens, scale=None):
    """float64 attention over dequantized caches kd, vd [B, Hkv, cap, D].

    Returns (out [B, H, D], p_max [B, Hkv, cap]).
    """
    B, H, D = q.shape
    Hkv, cap = kd.shape[1], kd.shape[2]
    G = H // Hkv
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qd = q.double().cpu().view(B, Hkv, G, D)
    logits = torch.einsum("bkgd,bktd->bkgt", qd, kd.double().cpu()) * s
    valid = torch.arange(cap)[None, None, None, :] < seq_lens.cpu().long()[:, None, None, None]
    logits = logits.masked_fill(~valid, float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m)
    den = p.sum(-1, keepdim=True)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    out = torch.einsum("bkgt,bktd->bkgd", p, vd.double().cpu()).reshape(B, H, D)
    return out, p.amax(2)


def qaq_sparse_attention_ref(q, kd, vd, page_idx, seq_lens, page_size, scale=None):
    """Quest over the dequantized cache: float64 attention over the tokens of
    the pages ``page_idx`` ``[B, Hkv, n_sel]`` (``-1``: none; tokens ``t <
    seq_lens``) of dequantized caches ``kd``, ``vd`` ``[B, Hkv, cap, D]``.

    Returns ``(out [B, H, D], p_max [B, Hkv, n_sel * P])``: per slot ``i * P + j``
    (token ``page_idx[.., i] * P + j``) the largest probability over the query
    heads of the KV head, 0 where the slot selects nothing.
    """
    B, H, D = q.shape
    Hkv, cap = kd.shape[1], kd.shape[2]
    G = H // Hkv
    P = int(page_size)
    n_sel = page_idx.shape[2]
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    pi = page_idx.long().cpu()
    slot = torch.arange(n_sel * P)
    tok = pi[:, :, slot // P] * P + slot % P  # [B, Hkv, n_slot]
    sel = (pi[:, :, slot // P] >= 0) & (tok < seq_lens.cpu().long().view(B, 1, 1))
    tok = torch.where(sel, tok, torch.zeros_like(tok))
    kg = kd.double().cpu().gather(2, tok.unsqueeze(-1).expand(B, Hkv, n_sel * P, D))
    vg = vd.double().cpu().gather(2, tok.unsqueeze(-1).expand(B, Hkv, n_sel * P, D))
    logits = torch.einsum("bkgd,bktd->bkgt", q.double().cpu().view(B, Hkv, G, D), kg) * s
    logits = logits.masked_fill(~sel.unsqueeze(2), float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m)
    den = p.sum(-1, keepdim=True)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    out = torch.einsum("bkgt,bktd->bkgd", p, vg).reshape(B, H, D)
    return out, p.amax(2)
