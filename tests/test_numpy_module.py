"""Tests of kvsparse._kernels_np (CPU kernels over NumPy arrays): the Quest
functions against a float64 NumPy reference, the SparQ and QAQ functions
against the torch ops (the same kernels: equal results)."""
import math

import numpy as np
import pytest

try:
    from kvsparse import _kernels_np as K
except ImportError:  # the extension was not built
    K = pytest.importorskip("kvsparse._kernels_np")


# ---------------------------------------------------------------- reference


def n_pages(length, P):
    return -(-int(length) // P)


def ref_metadata(k, seq_lens, P):
    B, Hkv, cap, D = k.shape
    mp = n_pages(cap, P)
    kmin = np.zeros((B, Hkv, mp, D))
    kmax = np.zeros((B, Hkv, mp, D))
    k64 = k.astype(np.float64)
    for b in range(B):
        L = int(seq_lens[b])
        for p in range(n_pages(L, P)):
            t0, t1 = p * P, min((p + 1) * P, L)
            kmin[b, :, p] = k64[b, :, t0:t1].min(axis=1)
            kmax[b, :, p] = k64[b, :, t0:t1].max(axis=1)
    return kmin, kmax


def ref_scores(q, kmin, kmax, seq_lens, P, group):
    B, H, D = q.shape
    Hkv, mp = kmin.shape[1], kmin.shape[2]
    G = H // Hkv
    q64 = q.astype(np.float64)
    lo = np.repeat(kmin.astype(np.float64), G, axis=1)  # [B, H, mp, D]
    hi = np.repeat(kmax.astype(np.float64), G, axis=1)
    s = np.maximum(q64[:, :, None, :] * lo, q64[:, :, None, :] * hi).sum(-1)  # [B, H, mp]
    if group:
        s = s.reshape(B, Hkv, G, mp).sum(2)
    for b in range(B):
        s[b, :, n_pages(seq_lens[b], P):] = -np.inf
    return s


def ref_select(scores, seq_lens, P, n_sel):
    B, Hs, mp = scores.shape
    out = np.full((B, Hs, n_sel), -1, dtype=np.int32)
    for b in range(B):
        npg = n_pages(seq_lens[b], P)
        for r in range(Hs):
            if npg <= n_sel:
                sel = list(range(npg))
            else:
                others = sorted(range(npg - 1), key=lambda i: (-float(scores[b, r, i]), i))
                sel = sorted(others[: n_sel - 1]) + [npg - 1]
            out[b, r, : len(sel)] = sel
    return out


def ref_sparse_attn(q, k, v, page_idx, seq_lens, P, scale):
    B, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    Hs = page_idx.shape[1]
    out = np.zeros((B, H, D))
    for b in range(B):
        L = int(seq_lens[b])
        for h in range(H):
            hk = h // G
            r = h if Hs == H else hk
            toks = []
            for p in page_idx[b, r]:
                if p < 0:
                    continue
                toks.extend(range(p * P, min((p + 1) * P, L)))
            if not toks:
                continue
            kk = k[b, hk, toks].astype(np.float64)
            vv = v[b, hk, toks].astype(np.float64)
            logits = scale * (kk @ q[b, h].astype(np.float64))
            w = np.exp(logits - logits.max())
            out[b, h] = (w / w.sum()) @ vv
    return out


def ref_dense_attn(q, k, v, seq_lens, scale):
    B, H, D = q.shape
    G = H // k.shape[1]
    out = np.zeros((B, H, D))
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        for h in range(H):
            kk = k[b, h // G, :L].astype(np.float64)
            vv = v[b, h // G, :L].astype(np.float64)
            logits = scale * (kk @ q[b, h].astype(np.float64))
            w = np.exp(logits - logits.max())
            out[b, h] = (w / w.sum()) @ vv
    return out


# ---------------------------------------------------------------- helpers

DTYPES = [np.float32, np.float16]


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=2e-2, atol=2e-2)


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def make(rng, B, H, Hkv, cap, D, dtype, lens=None):
    q = rand(rng, (B, H, D), dtype)
    k = rand(rng, (B, Hkv, cap, D), dtype)
    v = rand(rng, (B, Hkv, cap, D), dtype)
    if lens is None:
        lens = rng.integers(1, cap + 1, size=B)
    return q, k, v, np.asarray(lens, dtype=np.int32)


CONFIGS = [
    # B, H, Hkv, cap, D, P, lens
    (1, 4, 4, 100, 64, 16, [100]),
    (3, 6, 2, 77, 64, 16, [77, 1, 40]),
    (3, 8, 2, 130, 128, 16, [129, 64, 17]),
    (1, 12, 3, 50, 128, 8, [33]),
    (3, 4, 1, 45, 64, 7, [45, 0, 22]),
]


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_page_metadata(dtype, cfg):
    B, H, Hkv, cap, D, P, lens = cfg
    rng = np.random.default_rng(1)
    _, k, _, seq = make(rng, B, H, Hkv, cap, D, dtype, lens)
    kmin, kmax = K.page_metadata(k, seq, page_size=P)
    assert kmin.dtype == dtype and kmax.dtype == dtype
    assert kmin.shape == (B, Hkv, n_pages(cap, P), D)
    rmin, rmax = ref_metadata(k, seq, P)
    # min / max of representable values are exact
    np.testing.assert_array_equal(kmin.astype(np.float64), rmin)
    np.testing.assert_array_equal(kmax.astype(np.float64), rmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_metadata_ignores_tokens_past_length(dtype):
    rng = np.random.default_rng(2)
    k = rand(rng, (2, 2, 40, 16), dtype)
    seq = np.array([21, 40], dtype=np.int32)
    kmin1, kmax1 = K.page_metadata(k, seq, page_size=8)
    k2 = k.copy()
    k2[0, :, 21:] = 1e4  # garbage past the length must not matter
    k2[0, :, 21:, ::2] = -1e4
    kmin2, kmax2 = K.page_metadata(k2, seq, page_size=8)
    np.testing.assert_array_equal(kmin1, kmin2)
    np.testing.assert_array_equal(kmax1, kmax2)
    assert np.all(kmin1[0, :, 3:] == 0) and np.all(kmax1[0, :, 3:] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [16, 5])
def test_update_metadata_incremental(dtype, P):
    rng = np.random.default_rng(3)
    B, Hkv, cap, D = 3, 2, 90, 64
    k = rand(rng, (B, Hkv, cap, D), dtype)
    lens = np.array([0, 3, 17], dtype=np.int32)
    kmin, kmax = K.page_metadata(k, lens, page_size=P)
    for step in range(6):
        new = np.minimum(lens + rng.integers(0, 20, size=B).astype(np.int32), cap).astype(np.int32)
        if step == 5:
            new = np.full(B, cap, dtype=np.int32)
        # poison every page the update must rewrite
        for b in range(B):
            kmin[b, :, lens[b] // P:] = np.nan
            kmax[b, :, lens[b] // P:] = np.nan
        K.update_metadata(k, kmin, kmax, lens, new, page_size=P)
        fmin, fmax = K.page_metadata(k, new, page_size=P)
        np.testing.assert_array_equal(kmin, fmin)
        np.testing.assert_array_equal(kmax, fmax)
        lens = new


def test_update_metadata_leaves_earlier_pages():
    rng = np.random.default_rng(4)
    k = rand(rng, (1, 1, 64, 8), np.float32)
    kmin = np.full((1, 1, 4, 8), 7.0, dtype=np.float32)
    kmax = np.full((1, 1, 4, 8), 7.0, dtype=np.float32)
    K.update_metadata(k, kmin, kmax, np.array([35], np.int32), np.array([40], np.int32), 16)
    assert np.all(kmin[0, 0, :2] == 7.0) and np.all(kmax[0, 0, :2] == 7.0)
    np.testing.assert_array_equal(kmin[0, 0, 2], k[0, 0, 32:40].min(0))
    np.testing.assert_array_equal(kmax[0, 0, 2], k[0, 0, 32:40].max(0))
    assert np.all(kmin[0, 0, 3] == 0) and np.all(kmax[0, 0, 3] == 0)


# ---------------------------------------------------------------- scores


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_page_scores(dtype, group, cfg):
    B, H, Hkv, cap, D, P, lens = cfg
    rng = np.random.default_rng(5)
    q, k, _, seq = make(rng, B, H, Hkv, cap, D, dtype, lens)
    kmin, kmax = K.page_metadata(k, seq, page_size=P)
    s = K.page_scores(q, kmin, kmax, seq, page_size=P, group=group)
    assert s.dtype == np.float32
    assert s.shape == (B, Hkv if group else H, n_pages(cap, P))
    ref = ref_scores(q, kmin, kmax, seq, P, group)
    assert np.array_equal(np.isneginf(s), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(s[fin], ref[fin], rtol=1e-4, atol=1e-3)


def test_page_scores_default_is_group():
    rng = np.random.default_rng(6)
    q, k, _, seq = make(rng, 2, 4, 2, 40, 16, np.float32, [40, 9])
    kmin, kmax = K.page_metadata(k, seq)
    s = K.page_scores(q, kmin, kmax, seq)
    assert s.shape == (2, 2, 3)
    np.testing.assert_array_equal(s, K.page_scores(q, kmin, kmax, seq, 16, True))


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("budget_pages", [1, 2, 3, 5, 8, 100])
def test_select_pages_random(budget_pages):
    rng = np.random.default_rng(7 + budget_pages)
    P, mp, B, Hs = 16, 20, 3, 4
    scores = rng.standard_normal((B, Hs, mp)).astype(np.float32)
    seq = np.array([mp * P, 97, 0], dtype=np.int32)
    for b in range(B):
        scores[b, :, n_pages(seq[b], P):] = -np.inf
    idx = K.select_pages(scores, seq, P, budget_pages * P + P // 2)
    n_sel = min(budget_pages, mp)
    assert idx.dtype == np.int32 and idx.shape == (B, Hs, n_sel)
    np.testing.assert_array_equal(idx, ref_select(scores, seq, P, n_sel))


def test_select_pages_ties_and_small():
    P = 4
    # many equal scores: ties go to the lower page index
    scores = np.array([[[1, 3, 3, 2, 3, 3, 0, 5, 9, 9]]], dtype=np.float32)
    seq = np.array([37], dtype=np.int32)  # 10 pages, last page partial
    idx = K.select_pages(scores, seq, page_size=P, token_budget=4 * P)
    np.testing.assert_array_equal(idx, [[[1, 7, 8, 9]]])
    idx = K.select_pages(scores, seq, page_size=P, token_budget=5 * P)
    np.testing.assert_array_equal(idx, [[[1, 2, 7, 8, 9]]])
    idx = K.select_pages(scores, seq, page_size=P, token_budget=6 * P + 3)
    np.testing.assert_array_equal(idx, [[[1, 2, 4, 7, 8, 9]]])
    idx = K.select_pages(scores, seq, page_size=P, token_budget=P)
    np.testing.assert_array_equal(idx, [[[9]]])
    # np <= n_sel: every page, padded with -1
    idx = K.select_pages(scores, np.array([9], np.int32), page_size=P, token_budget=4 * P)
    np.testing.assert_array_equal(idx, [[[0, 1, 2, -1]]])
    # length 0: all -1
    idx = K.select_pages(scores, np.array([0], np.int32), page_size=P, token_budget=3 * P)
    np.testing.assert_array_equal(idx, [[[-1, -1, -1]]])
    # all equal scores: the lowest pages
    eq = np.full((1, 2, 10), 0.5, dtype=np.float32)
    idx = K.select_pages(eq, np.array([40], np.int32), page_size=P, token_budget=3 * P)
    np.testing.assert_array_equal(idx, [[[0, 1, 9], [0, 1, 9]]])


def test_select_pages_large_random_ties():
    rng = np.random.default_rng(9)
    P, mp = 16, 500
    scores = rng.integers(0, 5, size=(2, 3, mp)).astype(np.float32)
    seq = np.array([mp * P - 3, 4001], dtype=np.int32)
    for b in range(2):
        scores[b, :, n_pages(seq[b], P):] = -np.inf
    for budget in (P, 7 * P, 64 * P, 300 * P):
        n_sel = min(budget // P, mp)
        idx = K.select_pages(scores, seq, P, budget)
        np.testing.assert_array_equal(idx, ref_select(scores, seq, P, n_sel))


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("rows", ["head", "group"])
def test_sparse_attention(dtype, cfg, rows):
    B, H, Hkv, cap, D, P, lens = cfg
    rng = np.random.default_rng(10)
    q, k, v, seq = make(rng, B, H, Hkv, cap, D, dtype, lens)
    Hs = H if rows == "head" else Hkv
    mp = n_pages(cap, P)
    n_sel = min(3, mp)
    idx = np.full((B, Hs, n_sel), -1, dtype=np.int32)
    for b in range(B):
        npg = n_pages(seq[b], P)
        for r in range(Hs):
            m = min(npg, int(rng.integers(0, n_sel + 1)))
            idx[b, r, :m] = np.sort(rng.choice(npg, size=m, replace=False))
    out = K.sparse_attention(q, k, v, idx, seq, page_size=P)
    assert out.dtype == dtype and out.shape == q.shape
    ref = ref_sparse_attn(q, k, v, idx, seq, P, 1.0 / math.sqrt(D))
    np.testing.assert_allclose(out.astype(np.float64), ref, **tol(dtype))


def test_sparse_attention_scale_and_masking():
    rng = np.random.default_rng(11)
    q, k, v, seq = make(rng, 2, 4, 2, 50, 32, np.float32, [37, 50])
    idx = np.array([[[0, 2, -1]] * 2, [[-1, 1, 3]] * 2], dtype=np.int32)
    out = K.sparse_attention(q, k, v, idx, seq, page_size=16, scale=0.3)
    ref = ref_sparse_attn(q, k, v, idx, seq, 16, 0.3)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # garbage past the length (including inf / nan) is never read
    k2, v2 = k.copy(), v.copy()
    k2[0, :, 37:] = np.nan
    v2[0, :, 37:] = np.inf
    out2 = K.sparse_attention(q, k2, v2, idx, seq, page_size=16, scale=0.3)
    np.testing.assert_array_equal(out, out2)
    # large logits stay finite (stable softmax)
    out3 = K.sparse_attention(q * 200, k, v, idx, seq, page_size=16)
    assert np.all(np.isfinite(out3))
    ref3 = ref_sparse_attn(q * 200, k, v, idx, seq, 16, 1 / math.sqrt(32))
    np.testing.assert_allclose(out3, ref3, rtol=1e-3, atol=1e-3)


def test_sparse_attention_empty_rows_are_zero():
    rng = np.random.default_rng(12)
    q, k, v, seq = make(rng, 2, 2, 2, 32, 8, np.float32, [0, 32])
    idx = np.array([[[-1, -1]] * 2, [[-1, -1], [1, -1]]], dtype=np.int32)
    out = K.sparse_attention(q, k, v, idx, seq, page_size=16)
    assert np.all(out[0] == 0) and np.all(out[1, 0] == 0)
    assert np.any(out[1, 1] != 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("group", [False, True])
def test_attention_dense_when_budget_covers(dtype, cfg, group):
    B, H, Hkv, cap, D, P, lens = cfg
    rng = np.random.default_rng(13)
    q, k, v, seq = make(rng, B, H, Hkv, cap, D, dtype, lens)
    kmin, kmax = K.page_metadata(k, seq, page_size=P)
    out = K.attention(q, k, v, kmin, kmax, seq, page_size=P, token_budget=n_pages(cap, P) * P,
                      group=group)
    assert out.dtype == dtype and out.shape == q.shape
    ref = ref_dense_attn(q, k, v, seq, 1.0 / math.sqrt(D))
    np.testing.assert_allclose(out.astype(np.float64), ref, **tol(dtype))
    # a budget far larger than the cache is the same
    out2 = K.attention(q, k, v, kmin, kmax, seq, page_size=P, token_budget=10**6, group=group)
    np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("group", [False, True])
def test_attention_fused_equals_steps(dtype, cfg, group):
    B, H, Hkv, cap, D, P, lens = cfg
    rng = np.random.default_rng(14)
    q, k, v, seq = make(rng, B, H, Hkv, cap, D, dtype, lens)
    kmin, kmax = K.page_metadata(k, seq, page_size=P)
    budget = 2 * P + 1
    s = K.page_scores(q, kmin, kmax, seq, P, group)
    idx = K.select_pages(s, seq, P, budget)
    steps = K.sparse_attention(q, k, v, idx, seq, P)
    fused = K.attention(q, k, v, kmin, kmax, seq, P, budget, group)
    np.testing.assert_array_equal(fused, steps)
    # and against the float64 reference of the whole pipeline
    ref_s = ref_scores(q, kmin, kmax, seq, P, group)
    ref_idx = ref_select(s, seq, P, idx.shape[2])  # selection on the kernel's own scores
    np.testing.assert_array_equal(idx, ref_idx)
    fin = np.isfinite(ref_s)
    np.testing.assert_allclose(s[fin], ref_s[fin], rtol=1e-4, atol=1e-3)
    ref = ref_sparse_attn(q, k, v, ref_idx, seq, P, 1.0 / math.sqrt(D))
    np.testing.assert_allclose(fused.astype(np.float64), ref, **tol(dtype))


def test_attention_keywords_and_scale():
    rng = np.random.default_rng(15)
    q, k, v, seq = make(rng, 1, 2, 1, 64, 16, np.float32, [60])
    kmin, kmax = K.page_metadata(k=k, seq_lens=seq, page_size=8)
    out = K.attention(q=q, k=k, v=v, kmin=kmin, kmax=kmax, seq_lens=seq, page_size=8,
                      token_budget=64, group=False, scale=0.5)
    np.testing.assert_allclose(out, ref_dense_attn(q, k, v, seq, 0.5), rtol=2e-5, atol=2e-5)


def test_head_dim_256_and_odd_page():
    rng = np.random.default_rng(16)
    q, k, v, seq = make(rng, 2, 2, 1, 23, 256, np.float32, [23, 5])
    kmin, kmax = K.page_metadata(k, seq, page_size=3)
    np.testing.assert_array_equal(kmin, ref_metadata(k, seq, 3)[0])
    out = K.attention(q, k, v, kmin, kmax, seq, page_size=3, token_budget=30)
    np.testing.assert_allclose(out, ref_dense_attn(q, k, v, seq, 1 / 16), rtol=2e-5, atol=2e-5)


def test_float16_conversion_rounding():
    # metadata round-trips fp16 exactly, including subnormals, inf and extremes
    vals = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0, 6.1e-5, 5.96e-8, -3e-7,
                     np.inf, -np.inf, 1e-3, 333.3, 0.1, -0.1, 7.0], dtype=np.float16)
    k = vals.reshape(1, 1, 2, 8)
    kmin, kmax = K.page_metadata(k, np.array([1], np.int32), page_size=4)
    np.testing.assert_array_equal(kmin[0, 0, 0], vals[:8])
    np.testing.assert_array_equal(kmax[0, 0, 0], vals[:8])
    k = np.ascontiguousarray(vals[8:]).reshape(1, 1, 1, 8)
    kmin, kmax = K.page_metadata(k, np.array([1], np.int32), page_size=4)
    np.testing.assert_array_equal(kmin[0, 0, 0], vals[8:])
    # attention output is rounded to nearest fp16: a single token returns v exactly
    rng = np.random.default_rng(17)
    q = rand(rng, (1, 1, 8), np.float16)
    kk = rand(rng, (1, 1, 1, 8), np.float16)
    vv = (rng.standard_normal((1, 1, 1, 8)) * 1e-5).astype(np.float16)  # subnormal range
    out = K.sparse_attention(q, kk, vv, np.array([[[0]]], np.int32), np.array([1], np.int32))
    np.testing.assert_array_equal(out[0, 0], vv[0, 0, 0])


# ---------------------------------------------------------------- bad inputs


def _good(dtype=np.float32):
    rng = np.random.default_rng(20)
    q, k, v, seq = make(rng, 2, 4, 2, 32, 16, dtype, [32, 10])
    kmin, kmax = K.page_metadata(k, seq)
    return q, k, v, kmin, kmax, seq


def test_bad_dtypes():
    q, k, v, kmin, kmax, seq = _good()
    with pytest.raises(TypeError, match="k"):
        K.page_metadata(k.astype(np.float64), seq)
    with pytest.raises(TypeError, match="seq_lens"):
        K.page_metadata(k, seq.astype(np.int64))
    with pytest.raises(TypeError, match="k"):
        K.attention(q, k.astype(np.float16), v, kmin, kmax, seq)
    with pytest.raises(TypeError, match="v"):
        K.sparse_attention(q, k, v.astype(np.float16), np.zeros((2, 2, 1), np.int32), seq)
    with pytest.raises(TypeError, match="kmin"):
        K.page_scores(q, kmin.astype(np.float16), kmax, seq)
    with pytest.raises(TypeError, match="scores"):
        K.select_pages(np.zeros((2, 2, 2)), seq, 16, 32)
    with pytest.raises(TypeError, match="page_idx"):
        K.sparse_attention(q, k, v, np.zeros((2, 2, 1), np.int64), seq)
    with pytest.raises(TypeError, match="start_lens"):
        K.update_metadata(k, kmin, kmax, seq.astype(np.float32), seq)
    with pytest.raises(TypeError):
        K.page_metadata(k.tolist(), seq)
    with pytest.raises(TypeError, match="scale"):
        K.attention(q, k, v, kmin, kmax, seq, scale="x")


def test_bad_shapes_and_values():
    q, k, v, kmin, kmax, seq = _good()
    with pytest.raises(ValueError, match="k"):
        K.page_metadata(k[0], seq)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.page_metadata(k[:, :, ::2], seq)
    with pytest.raises(ValueError, match="q"):
        K.attention(np.asfortranarray(q), k, v, kmin, kmax, seq)
    with pytest.raises(ValueError, match="seq_lens"):
        K.page_metadata(k, np.array([33, 1], np.int32))
    with pytest.raises(ValueError, match="seq_lens"):
        K.page_metadata(k, np.array([-1, 1], np.int32))
    with pytest.raises(ValueError, match="seq_lens"):
        K.page_metadata(k, np.array([1, 1, 1], np.int32))
    with pytest.raises(ValueError, match="page_size"):
        K.page_metadata(k, seq, page_size=0)
    with pytest.raises(ValueError, match="page_size"):
        K.page_metadata(k, seq, page_size=-4)
    with pytest.raises(ValueError, match="token_budget"):
        K.attention(q, k, v, kmin, kmax, seq, page_size=16, token_budget=15)
    with pytest.raises(ValueError, match="token_budget"):
        K.select_pages(np.zeros((2, 2, 2), np.float32), seq, 16, 8)
    with pytest.raises(ValueError, match="multiple"):
        K.attention(q[:, :3].copy(), k, v, kmin, kmax, seq)
    with pytest.raises(ValueError, match="head dim"):
        K.page_metadata(np.zeros((1, 1, 4, 12), np.float32) + 1, np.array([4], np.int32))
    with pytest.raises(ValueError, match="head dim"):
        K.page_metadata(np.ones((1, 1, 4, 264), np.float32), np.array([4], np.int32))
    with pytest.raises(ValueError, match="kmin"):
        K.attention(q, k, v, kmin[:, :, :1].copy(), kmax, seq)
    with pytest.raises(ValueError, match="v"):
        K.attention(q, k, v[:, :, :16].copy(), kmin, kmax, seq)
    with pytest.raises(ValueError, match="start_lens"):
        K.update_metadata(k, kmin, kmax, np.array([32, 11], np.int32), seq)
    ro = kmin.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="kmin"):
        K.update_metadata(k, ro, kmax, seq, seq)
    with pytest.raises(ValueError, match="page_idx"):
        K.sparse_attention(q, k, v, np.full((2, 2, 1), 2, np.int32), seq)
    with pytest.raises(ValueError, match="page_idx"):
        K.sparse_attention(q, k, v, np.full((2, 3, 1), 0, np.int32), seq)
    with pytest.raises(ValueError, match="seq_lens"):
        K.page_scores(q, kmin, kmax, np.array([33, 0], np.int32))


def test_no_reference_leaks():
    import sys

    q, k, v, kmin, kmax, seq = _good()
    objs = [q, k, v, kmin, kmax, seq]
    before = [sys.getrefcount(o) for o in objs]
    for _ in range(50):
        K.page_metadata(k, seq)
        K.update_metadata(k, kmin, kmax, seq, seq)
        s = K.page_scores(q, kmin, kmax, seq)
        K.select_pages(s, seq, 16, 16)
        K.attention(q, k, v, kmin, kmax, seq, token_budget=16)
        with pytest.raises(ValueError):
            K.attention(q, k, v, kmin, kmax, seq, token_budget=1)
    assert [sys.getrefcount(o) for o in objs] == before
    out = K.attention(q, k, v, kmin, kmax, seq)
    assert sys.getrefcount(out) == 2


# ---------------------------------------------------------------- SparQ and QAQ against the torch ops
#
# The module's SparQ and QAQ functions call the same CPU kernels as the torch
# ops (torch.ops.kvsparse.sparq_build / sparq_attention / qaq_attention), so on
# the same inputs the results are identical, bit for bit.

try:
    import torch  # noqa: E402

    from kvsparse import qaq, sparq  # noqa: E402
except ImportError:  # the torch ops are not available: the comparisons are skipped
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and kvsparse._C")

SQ_CONFIGS = [
    # B, H, Hkv, cap, D, lens
    (1, 4, 4, 100, 64, [100]),
    (3, 6, 2, 77, 64, [77, 1, 40]),
    (2, 8, 2, 130, 128, [129, 0]),
    (1, 12, 3, 50, 256, [33]),
]


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SQ_CONFIGS)
def test_sparq_build_equals_torch_op(dtype, cfg):
    B, H, Hkv, cap, D, lens = cfg
    rng = np.random.default_rng(30)
    _, k, v, seq = make(rng, B, H, Hkv, cap, D, dtype, lens)
    kt, v_mean = K.sparq_build(k, v, seq)
    assert kt.dtype == dtype and kt.shape == (B, Hkv, D, cap)
    assert v_mean.dtype == np.float32 and v_mean.shape == (B, Hkv, D)
    tkt, tvm = sparq.build(torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(seq))
    np.testing.assert_array_equal(kt, tkt.numpy())
    np.testing.assert_array_equal(v_mean, tvm.numpy())
    np.testing.assert_array_equal(kt, k.transpose(0, 1, 3, 2))


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SQ_CONFIGS)
@pytest.mark.parametrize("group", [True, False], ids=["group", "head"])
@pytest.mark.parametrize("reallocate", [True, False], ids=["realloc", "plain"])
def test_sparq_attention_equals_torch_op(dtype, cfg, group, reallocate):
    B, H, Hkv, cap, D, lens = cfg
    rng = np.random.default_rng(31)
    q, k, v, seq = make(rng, B, H, Hkv, cap, D, dtype, lens)
    kt, v_mean = K.sparq_build(k, v, seq)
    tq, tk, tv, tkt, tvm, ts = (torch.from_numpy(a) for a in (q, k, v, kt, v_mean, seq))
    for r, k_top, window, scale in ((D // 8, 16, 4, None), (D, cap, 0, 0.3), (1, 1, 1, None)):
        out = K.sparq_attention(q, k, v, kt, v_mean, seq, r, k_top, local_window=window,
                                group=group, reallocate=reallocate, scale=scale)
        assert out.dtype == dtype and out.shape == q.shape
        exp = sparq.attention(tq, tk, tv, tkt, tvm, ts, r, k_top, local_window=window,
                              mode="group" if group else "head", reallocate=reallocate, scale=scale)
        np.testing.assert_array_equal(out, exp.numpy())
    # positional arguments and the defaults (local_window 0, group, reallocate, 1 / sqrt(D))
    out = K.sparq_attention(q, k, v, kt, v_mean, seq, 4, 8)
    np.testing.assert_array_equal(out, sparq.attention(tq, tk, tv, tkt, tvm, ts, 4, 8).numpy())


def _qaq_store(rng, B, Hkv, cap, D, dtype, shared, alpha=0.05):
    """A torch QAQ store with tokens [0, cap) quantized at random widths, and the
    six arrays the NumPy module takes."""
    st = qaq.alloc(B, Hkv, cap, D, dtype=dtype, alpha=alpha, shared=shared)
    x = torch.from_numpy(rng.standard_normal((B, Hkv, cap, D)).astype(np.float32)).to(dtype)
    w = torch.from_numpy(rng.choice(np.array(qaq.WIDTHS, np.uint8), size=(B, st.groups, cap)))
    qaq.quantize(st, x, torch.zeros(B, dtype=torch.int32), w)
    return st, tuple(t.numpy() for t in st.tensors())


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shared", [False, True], ids=["head", "shared"])
@pytest.mark.parametrize("cfg", [(1, 4, 2, 37, 64, [37]), (3, 6, 2, 20, 128, [20, 0, 7]),
                                 (2, 3, 3, 9, 16, [5, 9])])
def test_qaq_attention_equals_torch_op(dtype, shared, cfg):
    B, H, Hkv, cap, D, lens = cfg
    dtype = getattr(torch, dtype)
    rng = np.random.default_rng(32)
    ks, ka = _qaq_store(rng, B, Hkv, cap, D, dtype, shared)
    vs, va = _qaq_store(rng, B, Hkv, cap, D, dtype, False)
    tq = torch.from_numpy(rng.standard_normal((B, H, D)).astype(np.float32)).to(dtype)
    ts = torch.tensor(lens, dtype=torch.int32)
    q, seq = tq.numpy(), ts.numpy()
    out, pm = K.qaq_attention(q, ka, va, seq, Hkv, return_p_max=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert pm.dtype == np.float32 and pm.shape == (B, Hkv, cap)
    exp, pexp = qaq.attention(tq, ks, vs, ts, return_p_max=True)
    np.testing.assert_array_equal(out, exp.numpy())
    np.testing.assert_array_equal(pm, pexp.numpy())
    out = K.qaq_attention(q, list(ka), va, seq, num_kv_heads=Hkv, scale=0.3)
    np.testing.assert_array_equal(out, qaq.attention(tq, ks, vs, ts, scale=0.3).numpy())
    # any sequence of six arrays, fresh ones too (the call keeps them alive)
    out = K.qaq_attention(q, (t.numpy().copy() for t in ks.tensors()), va, seq, Hkv)
    np.testing.assert_array_equal(out, qaq.attention(tq, ks, vs, ts).numpy())


def _qaq_good():
    rng = np.random.default_rng(33)
    _, ka = _qaq_store(rng, 2, 2, 8, 16, torch.float32, False, alpha=0.2)
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    return q, ka, np.array([8, 3], np.int32)


@needs_torch
def test_sparq_qaq_bad_inputs():
    q, k, v, _, _, seq = _good()
    kt, v_mean = K.sparq_build(k, v, seq)
    with pytest.raises(ValueError, match="v"):
        K.sparq_build(k, v[:, :, :16].copy(), seq)
    with pytest.raises(TypeError, match="v_mean"):
        K.sparq_attention(q, k, v, kt, v_mean.astype(np.float16), seq, 4, 8)
    with pytest.raises(ValueError, match="kt"):
        K.sparq_attention(q, k, v, np.ascontiguousarray(kt[:, :, :8]), v_mean, seq, 4, 8)
    with pytest.raises(ValueError, match=r"^r \("):
        K.sparq_attention(q, k, v, kt, v_mean, seq, 17, 8)
    with pytest.raises(ValueError, match="k_top"):
        K.sparq_attention(q, k, v, kt, v_mean, seq, 4, 33)
    with pytest.raises(ValueError, match="local_window"):
        K.sparq_attention(q, k, v, kt, v_mean, seq, 4, 8, local_window=-1)
    with pytest.raises(ValueError, match="seq_lens"):
        K.sparq_attention(q, k, v, kt, v_mean, np.array([33, 0], np.int32), 4, 8)
    q, ka, seq = _qaq_good()
    with pytest.raises(TypeError, match="k_store"):
        K.qaq_attention(q, ka[:5], ka, seq, 2)
    with pytest.raises(TypeError, match="v_sz"):
        K.qaq_attention(q, ka, ka[:3] + (ka[3].astype(np.float32),) + ka[4:], seq, 2)
    with pytest.raises(TypeError, match="k_oval"):
        K.qaq_attention(q.astype(np.float16), ka, ka, seq, 2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        K.qaq_attention(q, ka, ka, seq, 0)
    with pytest.raises(ValueError, match="k_offsets"):
        K.qaq_attention(q, ka, ka, seq, 4)
    bad_w = ka[2].copy()
    bad_w[1, 0, 2] = 3
    with pytest.raises(ValueError, match="k_widths"):
        K.qaq_attention(q, ka[:2] + (bad_w,) + ka[3:], ka, seq, 2)
    bad_w[1, 0, 2] = 8
    bad_o = ka[1].copy()
    bad_o[1, 0, 2] = ka[0].shape[1] - 1
    with pytest.raises(ValueError, match="v_offsets"):
        K.qaq_attention(q, ka, (ka[0], bad_o, bad_w) + ka[3:], seq, 2)
    bad_i = ka[4].copy()
    bad_i[0, 1, 7, 0] = 16
    with pytest.raises(ValueError, match="k_oidx"):
        K.qaq_attention(q, ka[:4] + (bad_i, ka[5]), ka, seq, 2)
    with pytest.raises(ValueError, match="seq_lens"):
        K.qaq_attention(q, ka, ka, np.array([9, 0], np.int32), 2)
    # values past seq_lens are not checked (never read)
    K.qaq_attention(q, ka[:4] + (bad_i, ka[5]), ka, np.array([7, 3], np.int32), 2)


@needs_torch
def test_sparq_qaq_no_reference_leaks():
    import sys

    q, k, v, _, _, seq = _good()
    kt, v_mean = K.sparq_build(k, v, seq)
    qq, ka, sq = _qaq_good()
    objs = [q, k, v, kt, v_mean, seq, qq, sq] + list(ka)
    before = [sys.getrefcount(o) for o in objs]
    for _ in range(50):
        K.sparq_build(k, v, seq)
        K.sparq_attention(q, k, v, kt, v_mean, seq, 4, 8)
        K.qaq_attention(qq, ka, list(ka), sq, 2, return_p_max=True)
        K.qaq_attention(qq, ka, (a for a in ka), sq, 2)
        with pytest.raises(ValueError):
            K.sparq_attention(q, k, v, kt, v_mean, seq, 4, 99)
        with pytest.raises(ValueError):
            K.qaq_attention(qq, ka, ka, sq, 0)
    assert [sys.getrefcount(o) for o in objs] == before
    out = K.sparq_attention(q, k, v, kt, v_mean, seq, 4, 8)
    assert sys.getrefcount(out) == 2
