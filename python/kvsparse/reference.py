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
        s = scores[b, :, : n - 1].double()
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
