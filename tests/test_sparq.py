"""Tests of the SparQ ops (torch.ops.kvsparse.sparq_*) against the float64
plain-PyTorch reference (kvsparse.reference.sparq_*).

CPU tests always run; CUDA tests are marked ``gpu`` and skipped without a GPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kvsparse import reference as ref
from kvsparse import sparq

from kvs_testing import DEVICES, DT_IDS, DTYPES, HAS_GPU  # noqa: E402
from kvs_testing import assert_close as _assert_close  # noqa: E402
from kvs_testing import NEW_D, NEW_D_DTYPES  # noqa: E402
from kvs_testing import dirty as _dirty  # noqa: E402
from kvs_testing import head_dim_cases as _cases  # noqa: E402
from kvs_testing import make_qkv as _make  # noqa: E402
from kvs_testing import seed as _seed  # noqa: E402

# s_hat: float32 logits of exactly representable products, then exp / sum
SHAT_TOL = dict(atol=1e-6, rtol=2e-4)
# the fused CUDA op against the step ops: one rounding of the output dtype
FUSED_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _bits_equal(a, b):
    """Bitwise equality (NaN payloads included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    it = torch.int32 if a.element_size() == 4 else torch.int16
    return torch.equal(a.contiguous().view(it), b.contiguous().view(it))


def _assert_shat(s, expected, sl):
    assert s.dtype == torch.float32
    s, e = s.double().cpu(), expected.double().cpu()
    assert torch.isfinite(s).all()
    cap = s.shape[-1]
    past = torch.arange(cap)[None] >= sl.long().cpu()[:, None]
    assert (s.masked_select(past[:, None, :].expand_as(s)) == 0).all(), "s_hat past seq_lens must be 0"
    torch.testing.assert_close(s, e, **SHAT_TOL)


# --------------------------------------------------------------------------
# the main sweep

CAP = 211
LENS = {1: [203], 3: [211, 7, 64]}  # ragged, one shorter than most k


#: beyond D = 64 and 128 the sweeps add kvs_testing.NEW_D (the CUDA attention's
#: padded lanes: 80, 96; a whole warp per token: 256)




def _configs(D):
    # (r, k, local_window, reallocate): r in {1, 8, D}; k below and above the
    # lengths (k = cap keeps everything); windows 0, < k and > k
    return [(1, 40, 0, True), (8, 100, 6, False), (D, CAP, 3, True), (8, 20, 50, True), (D, 9, 0, False)]


@pytest.mark.parametrize("device", DEVICES)
# (G, B): every pair for D = 64 / 128; the largest group (MAXG 8: the most
# shared memory at D = 256) and a padded one (G = 3 in a MAXG 4 kernel) for NEW_D
@pytest.mark.parametrize("dtype,D,G,B", _cases([(G, B) for G in (1, 3, 4, 8) for B in (1, 3)], [(8, 1), (3, 3)]))
@pytest.mark.parametrize("mode", ["group", "head"])
def test_pipeline_matches_reference(device, dtype, D, G, B, mode):
    Hkv = 2
    H = Hkv * G
    q, k, v, sl = _make(device, B, H, Hkv, CAP, D, dtype, LENS[B], _seed("sparq", dtype, D, G, B, mode))
    group = mode == "group"
    gs = G if group else 1
    Hs = H // gs
    _dirty(device)
    kt, vm = sparq.build(k, v, sl)
    assert kt.dtype == dtype and kt.shape == (B, Hkv, D, CAP) and torch.equal(kt, k.transpose(2, 3))
    torch.testing.assert_close(vm.double(), ref.sparq_build_ref(k, v, sl)[1], atol=1e-5, rtol=1e-5)

    cfgs = _configs(D)
    first = _seed("cfg", dtype, D, G, B, mode) % len(cfgs)  # 3 of the 5 configurations, rotating
    for r, kk, lw, realloc in [cfgs[(first + i) % len(cfgs)] for i in range(3)]:
        what = f"r={r} k={kk} lw={lw} realloc={realloc}"
        _dirty(device)
        i1 = sparq.top_channels(q, r, gs)
        assert i1.shape == (B, Hs, r) and i1.dtype == torch.int32
        assert torch.equal(i1.cpu(), ref.sparq_top_channels_ref(q, r, gs).cpu()), what

        s = sparq.approx_scores(q, kt, i1, sl)
        assert s.shape == (B, H, CAP)
        _assert_shat(s, ref.sparq_approx_scores_ref(q, k, i1, sl), sl)

        i2 = sparq.top_positions(s, sl, kk, lw, gs)
        assert i2.shape == (B, Hs, kk) and i2.dtype == torch.int32
        assert torch.equal(i2.cpu(), ref.sparq_top_positions_ref(s, sl, kk, lw, gs).cpu()), what

        out_s = sparq.sparse_attention(q, k, v, i2, s, vm, sl, reallocate=realloc)
        assert out_s.shape == (B, H, D) and out_s.dtype == dtype
        exp = ref.sparq_sparse_attention_ref(q, k, v, i2, s, vm, sl, None, realloc)
        _assert_close(out_s, exp, dtype, "sparse_attention " + what)

        _dirty(device)
        out = sparq.attention(q, k, v, kt, vm, sl, r, kk, lw, mode=mode, reallocate=realloc)
        assert out.shape == (B, H, D) and out.dtype == dtype
        if out.is_cuda:
            # sm_90 fuses the steps (the selection also normalises and sums
            # alpha, in its own order): the same positions, alpha within float
            # rounding
            tol = FUSED_TOL[dtype]
            torch.testing.assert_close(out.float(), out_s.float(), atol=tol, rtol=tol, msg=what)
        else:  # the fused op runs the same kernels: bit-identical to the step ops
            assert torch.equal(out, out_s), what
        exp = ref.sparq_attention_ref(q, k, v, sl, r, kk, lw, group, realloc, v_mean=vm, s_hat=s)
        _assert_close(out, exp, dtype, "attention " + what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,D,G,realloc", _cases([(G, r) for G in (1, 4) for r in (False, True)], [(4, True)]))
@pytest.mark.parametrize("mode", ["group", "head"])
def test_full_k_equals_sdpa(device, dtype, D, G, mode, realloc):
    """k >= every length: dense attention over the valid prefix (exactly so without
    reallocation; with it alpha is 1 up to rounding)."""
    Hkv, cap = 2, 150
    H = Hkv * G
    lens = [150, 33, 1, 96]
    q, k, v, sl = _make(device, 4, H, Hkv, cap, D, dtype, lens, _seed("sdpa", dtype, D, G, mode))
    kt, vm = sparq.build(k, v, sl)
    scale = 0.7 / math.sqrt(D)
    out = sparq.attention(q, k, v, kt, vm, sl, r=4, k_top=cap, local_window=2, mode=mode,
                          reallocate=realloc, scale=scale)
    for b, L in enumerate(lens):
        qb = q[b : b + 1, :, None, :].double()
        kb = k[b : b + 1, :, :L].double()
        vb = v[b : b + 1, :, :L].double()
        exp = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)[0, :, 0]
        _assert_close(out[b], exp, dtype, f"batch {b} (len {L})")


# --------------------------------------------------------------------------
# cache maintenance


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_build_and_append(device, dtype):
    B, Hkv, cap, D = 3, 2, 160, 64
    g = torch.Generator().manual_seed(_seed("append", dtype))
    k_all = torch.randn(B, Hkv, cap, D, generator=g).to(device=device, dtype=dtype)
    v_all = (torch.randn(B, Hkv, cap, D, generator=g) + 0.5).to(device=device, dtype=dtype)
    lens = torch.tensor([0, 5, 33], dtype=torch.int32, device=device)
    # the cache holds the first tokens; the rest of it is garbage
    k = torch.full_like(k_all, float("nan"))
    v = torch.full_like(v_all, float("inf"))
    for b, L in enumerate(lens.tolist()):
        k[b, :, :L] = k_all[b, :, :L]
        v[b, :, :L] = v_all[b, :, :L]
    kt, vm = sparq.build(k, v, lens)
    assert vm.dtype == torch.float32 and vm.shape == (B, Hkv, D)
    assert (vm[0] == 0).all()  # empty sequence
    assert torch.isfinite(vm).all()
    for n_new in [1, 16, 3, 1, 40, 1, 7]:
        kn = torch.stack([k_all[b, :, L : L + n_new] for b, L in enumerate(lens.tolist())]).contiguous()
        vn = torch.stack([v_all[b, :, L : L + n_new] for b, L in enumerate(lens.tolist())]).contiguous()
        sparq.append(kn, vn, k, v, kt, vm, lens)
        lens += n_new  # the op leaves seq_lens to the caller
        assert _bits_equal(kt, k.transpose(2, 3)), f"kt after appending {n_new}"
        for b, L in enumerate(lens.tolist()):
            assert torch.equal(k[b, :, :L], k_all[b, :, :L]) and torch.equal(v[b, :, :L], v_all[b, :, :L])
        expected = ref.sparq_build_ref(k_all, v_all, lens)[1]
        torch.testing.assert_close(vm.double(), expected, atol=2e-5, rtol=1e-5)
        kt2, vm2 = sparq.build(k, v, lens)
        torch.testing.assert_close(vm, vm2, atol=2e-5, rtol=1e-5)
    assert lens.tolist() == [69, 74, 102]


@pytest.mark.parametrize("device", DEVICES)
def test_append_rejects_overflow_on_cpu_and_skips_on_cuda(device):
    B, Hkv, cap, D = 2, 1, 8, 64
    k = torch.randn(B, Hkv, cap, D, device=device)
    v = torch.randn(B, Hkv, cap, D, device=device)
    lens = torch.tensor([6, 2], dtype=torch.int32, device=device)
    kt, vm = sparq.build(k, v, lens)
    kn = torch.randn(B, Hkv, 3, D, device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match="seq_lens"):
            sparq.append(kn, kn, k, v, kt, vm, lens)
    else:
        k0, vm0 = k.clone(), vm.clone()
        sparq.append(kn, kn, k, v, kt, vm, lens)
        assert torch.equal(k[0], k0[0]) and torch.equal(vm[0], vm0[0])  # overflowing sequence untouched
        assert torch.equal(k[1, :, 2:5], kn[1])


# --------------------------------------------------------------------------
# selection rules by hand


@pytest.mark.parametrize("device", DEVICES)
def test_top_channels_ties_and_groups(device):
    D = 64
    q = torch.ones(1, 4, D, device=device)
    q[0, 0, [5, 9, 40]] = 3.0
    q[0, 0, 12] = -3.0  # magnitude counts, not sign
    q[0, 1, [1, 2]] = -2.0
    # head mode: ties to the lower channel
    i1 = sparq.top_channels(q, 6, 1)
    assert i1[0, 0].tolist() == [0, 1, 5, 9, 12, 40]
    assert i1[0, 1].tolist() == [0, 1, 2, 3, 4, 5]
    assert i1[0, 2].tolist() == [0, 1, 2, 3, 4, 5]
    # group mode (2 heads per row): |q| summed over the group
    i1 = sparq.top_channels(q, 3, 2)
    assert i1.shape == (1, 2, 3)
    assert i1[0, 0].tolist() == [5, 9, 12]  # keys 4 at 5, 9, 12, 40 beat 3 at 1, 2; ties -> lower
    assert i1[0, 1].tolist() == [0, 1, 2]
    assert torch.equal(i1.cpu(), ref.sparq_top_channels_ref(q, 3, 2).cpu())
    assert sparq.top_channels(q, D, 4)[0, 0].tolist() == list(range(D))


@pytest.mark.parametrize("device", DEVICES)
def test_top_positions_rules(device):
    cap = 12
    s = torch.zeros(5, 2, cap, device=device)
    base = torch.tensor([0.1, 0.5, 0.5, 0.0, 0.9, 0.2, 0.5, 0.05, 0.3, 0.3, 0.7, 0.1])
    s[:] = base.to(device)
    s[:, 1] = base.flip(0).to(device)
    sl = torch.tensor([12, 10, 4, 0, 12], dtype=torch.int32, device=device)
    i2 = sparq.top_positions(s, sl, 4, 0, 1)
    assert i2[0, 0].tolist() == [1, 2, 4, 10]  # 0.5 ties: lower positions
    assert i2[1, 0].tolist() == [1, 2, 4, 6]  # only t < 10 counts
    assert i2[2, 0].tolist() == [0, 1, 2, 3]  # k >= len: everything
    assert i2[3, 0].tolist() == [-1, -1, -1, -1]  # empty sequence
    # a local window of 2: the last two positions plus the 2 best of the rest
    i2 = sparq.top_positions(s, sl, 4, 2, 1)
    assert i2[0, 0].tolist() == [1, 4, 10, 11]
    assert i2[1, 0].tolist() == [1, 4, 8, 9]  # window 8, 9 of len 10; then 0.9 at 4, 0.5 at 1
    # window larger than k: only the window
    i2 = sparq.top_positions(s, sl, 3, 10, 1)
    assert i2[0, 0].tolist() == [9, 10, 11] and i2[2, 0].tolist() == [1, 2, 3]
    # k = cap with a shorter sequence: padded with -1
    i2 = sparq.top_positions(s, sl, cap, 0, 1)
    assert i2[2, 0].tolist() == [0, 1, 2, 3] + [-1] * 8
    # group mode: the two rows summed
    i2 = sparq.top_positions(s, sl, 3, 0, 2)
    summed = base + base.flip(0)
    assert i2.shape == (5, 1, 3)
    assert i2[0, 0].tolist() == sorted(torch.sort(summed, descending=True, stable=True).indices[:3].tolist())
    for lw in (0, 2, 10):
        for gs in (1, 2):
            assert torch.equal(sparq.top_positions(s, sl, 4, lw, gs).cpu(), ref.sparq_top_positions_ref(s, sl, 4, lw, gs).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_head_and_group_modes_differ(device):
    B, G, Hkv, D, cap = 1, 4, 2, 64, 256
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, torch.float32, [250], _seed("modes"))
    kt, vm = sparq.build(k, v, sl)
    i1h, i1g = sparq.top_channels(q, 8, 1), sparq.top_channels(q, 8, G)
    assert i1h.shape == (1, 8, 8) and i1g.shape == (1, 2, 8)
    oh = sparq.attention(q, k, v, kt, vm, sl, 8, 32, mode="head")
    og = sparq.attention(q, k, v, kt, vm, sl, 8, 32, mode="group")
    assert not torch.allclose(oh, og)
    # group mode: each head uses its own q values (and tau) on the shared i1
    s = sparq.approx_scores(q, kt, i1g, sl)
    assert not torch.allclose(s[0, 0], s[0, 1])
    _assert_shat(s, ref.sparq_approx_scores_ref(q, k, i1g, sl), sl)


@pytest.mark.parametrize("device", DEVICES)
def test_reallocation_by_hand(device):
    """alpha = the s_hat mass of the kept positions; empty rows give v_mean."""
    B, H, Hkv, D, cap = 2, 2, 1, 64, 16
    q, k, v, sl = _make(device, B, H, Hkv, cap, D, torch.float32, [16, 0], _seed("realloc"))
    kt, vm = sparq.build(k, v, sl)
    s = torch.zeros(B, H, cap, device=device)
    s[0, 0, :] = 1.0 / 16
    s[0, 1, 3] = 0.75
    s[0, 1, 5] = 0.25
    i2 = torch.tensor([[[3, 5, -1]], [[-1, -1, -1]]], dtype=torch.int32, device=device)
    out = sparq.sparse_attention(q, k, v, i2, s, vm, sl)
    y = ref.sparq_sparse_attention_ref(q, k, v, i2, s, vm, sl, reallocate=False)
    torch.testing.assert_close(out[0, 0].double().cpu(), (0.125 * y[0, 0] + 0.875 * vm[0, 0].double()).cpu())
    torch.testing.assert_close(out[0, 1].double().cpu(), y[0, 1].cpu())  # alpha = 1
    assert (out[1] == 0).all() and (vm[1] == 0).all()  # empty sequence: v_mean = 0
    assert (sparq.sparse_attention(q, k, v, i2, s, vm, sl, reallocate=False)[1] == 0).all()


# --------------------------------------------------------------------------
# poison and edge cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cache_tail_poison_is_ignored(device, dtype):
    B, G, Hkv, D, cap = 3, 2, 2, 64, 100
    lens = [100, 41, 3]
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, dtype, lens, _seed("tail", dtype))
    kc, vc = k.clone(), v.clone()
    for b, L in enumerate(lens):
        k[b, :, L:] = float("nan")
        v[b, :, L:] = float("inf")
    _dirty(device)
    kt, vm = sparq.build(k, v, sl)
    assert torch.isfinite(vm).all()
    for mode in ("group", "head"):
        gs = G if mode == "group" else 1
        _dirty(device)
        i1 = sparq.top_channels(q, 8, gs)
        s = sparq.approx_scores(q, kt, i1, sl)
        _assert_shat(s, ref.sparq_approx_scores_ref(q, kc, i1, sl), sl)
        i2 = sparq.top_positions(s, sl, 16, 2, gs)
        o1 = sparq.sparse_attention(q, k, v, i2, s, vm, sl)
        o2 = sparq.attention(q, k, v, kt, vm, sl, 8, 16, 2, mode=mode)
        exp = ref.sparq_sparse_attention_ref(q, kc, vc, i2, s, vm, sl)
        _assert_close(o1, exp, dtype, "sparse_attention")
        _assert_close(o2, exp, dtype, "attention")


@pytest.mark.parametrize("device", DEVICES)
def test_long_context_multi_block(device):
    """Several score blocks per row, many attention splits and a long selection."""
    B, G, Hkv, D, cap = 2, 4, 2, 128, 3000
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, torch.float16, [3000, 2049], _seed("long"))
    kt, vm = sparq.build(k, v, sl)
    for mode, kk, lw in (("group", 700, 64), ("head", 1500, 0)):
        gs = G if mode == "group" else 1
        i1 = sparq.top_channels(q, 16, gs)
        s = sparq.approx_scores(q, kt, i1, sl)
        _assert_shat(s, ref.sparq_approx_scores_ref(q, k, i1, sl), sl)
        i2 = sparq.top_positions(s, sl, kk, lw, gs)
        assert torch.equal(i2.cpu(), ref.sparq_top_positions_ref(s, sl, kk, lw, gs).cpu())
        out = sparq.attention(q, k, v, kt, vm, sl, 16, kk, lw, mode=mode)
        exp = ref.sparq_sparse_attention_ref(q, k, v, i2, s, vm, sl)
        _assert_close(out, exp, torch.float16, mode)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_length_sequences(device):
    B, G, Hkv, D, cap = 2, 2, 2, 64, 32
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, torch.float32, [0, 20], _seed("zero"))
    kt, vm = sparq.build(k, v, sl)
    _dirty(device)
    s = sparq.approx_scores(q, kt, sparq.top_channels(q, 4, G), sl)
    assert (s[0] == 0).all()
    torch.testing.assert_close(s[1].sum(-1).cpu(), torch.ones(G * Hkv), atol=1e-5, rtol=0)
    i2 = sparq.top_positions(s, sl, 8, 0, G)
    assert (i2[0] == -1).all()
    out = sparq.attention(q, k, v, kt, vm, sl, 4, 8)
    assert (out[0] == 0).all() and torch.isfinite(out).all()


# --------------------------------------------------------------------------
# choose_r_k


def test_choose_r_k():
    assert sparq.choose_r_k(128, 4096, 1 / 8) == (16, 256)
    assert sparq.choose_r_k(64, 1000, 0.25) == (16, 125)
    assert sparq.choose_r_k(128, 10, 0.01) == (1, 1)  # clamped from below
    assert sparq.choose_r_k(128, 100, 1.0) == (128, 50)
    for D, S, c in [(128, 4096, 1 / 8), (64, 8192, 1 / 16), (128, 131072, 1 / 4)]:
        r, k = sparq.choose_r_k(D, S, c)
        ratio = (r * S + 2 * k * D) / (2 * S * D)
        assert abs(ratio - c) <= 1e-3 * c + 1.0 / D, (D, S, c, r, k, ratio)
        assert abs(r / (2 * D) - k / S) <= 1.0 / D  # half of the budget per stage
    for bad in [0.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match="compression"):
            sparq.choose_r_k(128, 100, bad)
    with pytest.raises(ValueError, match="D"):
        sparq.choose_r_k(0, 100, 0.5)
    with pytest.raises(ValueError, match="seq_len"):
        sparq.choose_r_k(64, 0, 0.5)


# --------------------------------------------------------------------------
# opcheck


def _small_args(device):
    g = torch.Generator().manual_seed(_seed("opcheck"))
    B, H, Hkv, cap, D = 2, 4, 2, 37, 64
    q = torch.randn(B, H, D, generator=g).to(device)
    k = torch.randn(B, Hkv, cap, D, generator=g).to(device)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(device)
    sl = torch.tensor([30, 11], dtype=torch.int32, device=device)
    kt, vm = torch.ops.kvsparse.sparq_build(k, v, sl)
    i1 = torch.ops.kvsparse.sparq_top_channels(q, 8, 2)
    s = torch.ops.kvsparse.sparq_approx_scores(q, kt, i1, sl)
    i2 = torch.ops.kvsparse.sparq_top_positions(s, sl, 12, 2, 2)
    kn = torch.randn(B, Hkv, 2, D, generator=g).to(device)
    return dict(q=q, k=k, v=v, sl=sl, kt=kt, vm=vm, i1=i1, s=s, i2=i2, kn=kn)


OPCHECK_CASES = {
    "sparq_build": lambda a: (a["k"], a["v"], a["sl"]),
    "sparq_append": lambda a: (a["kn"], a["kn"], a["k"], a["v"], a["kt"], a["vm"], a["sl"]),
    "sparq_top_channels": lambda a: (a["q"], 8, 1),
    "sparq_approx_scores": lambda a: (a["q"], a["kt"], a["i1"], a["sl"]),
    "sparq_top_positions": lambda a: (a["s"], a["sl"], 10, 3, 1),
    "sparq_sparse_attention": lambda a: (a["q"], a["k"], a["v"], a["i2"], a["s"], a["vm"], a["sl"], 0.125, True),
    "sparq_attention": lambda a: (a["q"], a["k"], a["v"], a["kt"], a["vm"], a["sl"], 8, 12, 2, True, True, 0.125),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", list(OPCHECK_CASES))
def test_opcheck(device, op_name):
    args = OPCHECK_CASES[op_name](_small_args(device))
    op = getattr(torch.ops.kvsparse, op_name).default
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------
# bad inputs


def _bad_base(device):
    B, H, Hkv, cap, D = 2, 4, 2, 40, 64
    q = torch.randn(B, H, D, device=device)
    k = torch.randn(B, Hkv, cap, D, device=device)
    v = torch.randn(B, Hkv, cap, D, device=device)
    sl = torch.tensor([40, 9], dtype=torch.int32, device=device)
    kt, vm = sparq.build(k, v, sl)
    return q, k, v, sl, kt, vm


def _attn(q, k, v, kt, vm, sl, **kw):
    kw.setdefault("r", 8)
    kw.setdefault("k_top", 16)
    return sparq.attention(q, k, v, kt, vm, sl, **kw)


def _s(q, sl):
    return torch.full((q.shape[0], q.shape[1], 40), 0.025, device=q.device)


def _i2(q, n=4, rows=2, dtype=torch.int32, val=0):
    return torch.full((q.shape[0], rows, n), val, dtype=dtype, device=q.device)


def _bad_cases():
    """(name, fn(q, k, v, sl, kt, vm), exception, match, cpu_only)."""
    cases = []

    def add(name, fn, exc, match, cpu_only=False):
        cases.append(pytest.param(fn, exc, match, cpu_only, id=name))

    add("q_float64", lambda q, k, v, sl, kt, vm: _attn(q.double(), k, v, kt, vm, sl), TypeError, r"\bq\b")
    add("k_dtype_mix", lambda q, k, v, sl, kt, vm: _attn(q, k.half(), v, kt, vm, sl), TypeError, r"\bk\b")
    add("v_dtype_mix", lambda q, k, v, sl, kt, vm: _attn(q, k, v.bfloat16(), kt, vm, sl), TypeError, r"\bv\b")
    add("kt_dtype_mix", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt.half(), vm, sl), TypeError, r"\bkt\b")
    add("v_mean_f16", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm.half(), sl), TypeError, "v_mean")
    add("seq_lens_int64", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl.long()), TypeError, "seq_lens")
    add("s_hat_f16", lambda q, k, v, sl, kt, vm: sparq.top_positions(_s(q, sl).half(), sl, 4), TypeError, "s_hat")
    add("i1_int64", lambda q, k, v, sl, kt, vm: sparq.approx_scores(q, kt, _i2(q, dtype=torch.long), sl), TypeError, "i1")
    add("i2_int64", lambda q, k, v, sl, kt, vm: sparq.sparse_attention(q, k, v, _i2(q, dtype=torch.long), _s(q, sl), vm, sl), TypeError, "i2")
    add("k_new_dtype", lambda q, k, v, sl, kt, vm: sparq.append(k[:, :, :1].half().contiguous(), v[:, :, :1].contiguous(), k, v, kt, vm, sl - 1), TypeError, "k_new")
    add("build_int", lambda q, k, v, sl, kt, vm: sparq.build(k.int(), v, sl), TypeError, r"\bk\b")
    add("q_rank", lambda q, k, v, sl, kt, vm: _attn(q[:, :, None], k, v, kt, vm, sl), ValueError, r"\bq\b")
    add("kt_shape", lambda q, k, v, sl, kt, vm: _attn(q, k, v, k.contiguous(), vm, sl), ValueError, r"\bkt\b")
    add("kt_noncontig", lambda q, k, v, sl, kt, vm: _attn(q, k, v, k.transpose(2, 3), vm, sl), ValueError, r"\bkt\b")
    add("v_mean_shape", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm[:, :1].contiguous(), sl), ValueError, "v_mean")
    add("v_shape", lambda q, k, v, sl, kt, vm: _attn(q, k, v[:, :, :30].contiguous(), kt, vm, sl), ValueError, r"\bv\b")
    add("seq_lens_shape", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl[:1]), ValueError, "seq_lens")
    add("q_noncontig", lambda q, k, v, sl, kt, vm: _attn(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, kt, vm, sl), ValueError, r"\bq\b")
    add("H_not_multiple", lambda q, k, v, sl, kt, vm: _attn(q[:, :3].contiguous(), k, v, kt, vm, sl), ValueError, "Hkv")
    add("r_zero", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl, r=0), ValueError, r"\br\b")
    add("r_over_D", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl, r=65), ValueError, r"\br\b")
    add("top_channels_r", lambda q, k, v, sl, kt, vm: sparq.top_channels(q, 65), ValueError, r"\br\b")
    add("top_channels_group", lambda q, k, v, sl, kt, vm: sparq.top_channels(q, 4, 3), ValueError, "group_size")
    add("k_top_zero", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl, k_top=0), ValueError, "k_top")
    add("k_top_over_cap", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl, k_top=41), ValueError, "larger than the cache")
    add("k_over_cap", lambda q, k, v, sl, kt, vm: sparq.top_positions(_s(q, sl), sl, 41), ValueError, "larger than the cache")
    add("local_window_neg", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl, local_window=-1), ValueError, "local_window")
    add("bad_mode", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl, mode="token"), ValueError, "mode")
    add("i1_rows", lambda q, k, v, sl, kt, vm: sparq.approx_scores(q, kt, _i2(q, rows=3), sl), ValueError, "i1")
    add("i2_rows", lambda q, k, v, sl, kt, vm: sparq.sparse_attention(q, k, v, _i2(q, rows=3), _s(q, sl), vm, sl), ValueError, "i2")
    add("s_hat_shape", lambda q, k, v, sl, kt, vm: sparq.sparse_attention(q, k, v, _i2(q), _s(q, sl)[:, :, :39].contiguous(), vm, sl), ValueError, "s_hat")
    add("append_shape", lambda q, k, v, sl, kt, vm: sparq.append(k[:, :, :1].contiguous(), v[:, :, :2].contiguous(), k, v, kt, vm, sl - 2), ValueError, "v_new")
    add("seq_lens_over_cap", lambda q, k, v, sl, kt, vm: _attn(q, k, v, kt, vm, sl + 1), ValueError, "seq_lens", True)
    add("seq_lens_negative", lambda q, k, v, sl, kt, vm: sparq.build(k, v, sl - 10), ValueError, "seq_lens", True)
    add("i1_range", lambda q, k, v, sl, kt, vm: sparq.approx_scores(q, kt, _i2(q, val=64), sl), ValueError, "i1", True)
    add("i2_range", lambda q, k, v, sl, kt, vm: sparq.sparse_attention(q, k, v, _i2(q, val=40), _s(q, sl), vm, sl), ValueError, "i2", True)
    add("i2_neg", lambda q, k, v, sl, kt, vm: sparq.sparse_attention(q, k, v, _i2(q, val=-2), _s(q, sl), vm, sl), ValueError, "i2", True)
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn,exc,match,cpu_only", _bad_cases())
def test_bad_inputs(device, fn, exc, match, cpu_only):
    if cpu_only and device != "cpu":
        pytest.skip("values are trusted on CUDA (no host sync)")
    q, k, v, sl, kt, vm = _bad_base(device)
    with pytest.raises(exc, match=match):
        fn(q, k, v, sl, kt, vm)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_head_dim(device):
    D = 36 if device == "cpu" else 72  # CPU: D % 8 != 0; CUDA: not 64, 80, 96, 128 or 256
    k = torch.randn(1, 1, 16, D, device=device)
    sl = torch.tensor([16], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        sparq.build(k, k, sl)
    with pytest.raises(ValueError, match="head_dim"):
        sparq.top_channels(torch.randn(1, 1, D, device=device), 4)


# --------------------------------------------------------------------------
# CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
def test_cuda_device_mismatch_and_group_limit():
    q, k, v, sl, kt, vm = _bad_base("cuda")
    with pytest.raises(RuntimeError, match="seq_lens"):
        _attn(q, k, v, kt, vm, sl.cpu())
    with pytest.raises(RuntimeError, match=r"\bkt\b"):
        _attn(q, k, v, kt.cpu(), vm, sl)
    q16 = torch.randn(2, 32, 64, device="cuda")  # G = 16 > 8
    with pytest.raises(ValueError, match="at most 8"):
        _attn(q16, k, v, kt, vm, sl)
    _attn(q16, k, v, kt, vm, sl, mode="head")  # head mode has no such limit


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", ["group", "head"])
def test_cuda_graph_capture(dtype, mode):
    """Capture once; update q, the cache (append) and seq_lens in place; replay."""
    B, G, Hkv, D, cap = 3, 4, 2, 128, 3000
    q, k, v, sl = _make("cuda", B, G * Hkv, Hkv, cap, D, dtype, [2990, 1290, 7], _seed("graph3", dtype, mode))
    kt, vm = sparq.build(k, v, sl)
    r, kk, lw = 16, 400, 16
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            sparq.attention(q, k, v, kt, vm, sl, r, kk, lw, mode=mode)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparq.attention(q, k, v, kt, vm, sl, r, kk, lw, mode=mode)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, sparq.attention(q, k, v, kt, vm, sl, r, kk, lw, mode=mode), atol=0, rtol=0)
    g = torch.Generator().manual_seed(_seed("graph4", dtype, mode))
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=g).to(q))
        kn = torch.randn(B, Hkv, 2, D, generator=g).to(k)
        vn = torch.randn(B, Hkv, 2, D, generator=g).to(v)
        sparq.append(kn, vn, k, v, kt, vm, sl)
        sl += 2
        graph.replay()
        torch.cuda.synchronize()
        eager = sparq.attention(q, k, v, kt, vm, sl, r, kk, lw, mode=mode)
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
    gs = G if mode == "group" else 1
    s = sparq.approx_scores(q, kt, sparq.top_channels(q, r, gs), sl)
    exp = ref.sparq_attention_ref(q, k, v, sl, r, kk, lw, mode == "group", True, v_mean=vm, s_hat=s)
    _assert_close(out, exp, dtype, "graph replay")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
@pytest.mark.parametrize("cap", [1000, 40000, 131072])
def test_cuda_top_positions_large_matches_cpu(cap):
    """The streaming radix select on long rows (up to 128K positions, k up to 16K)
    picks exactly what the CPU heap picks, ties included."""
    g = torch.Generator().manual_seed(cap)
    B, H = 2, 4
    s = torch.rand(B, H, cap, generator=g) ** 4
    s[0, 0, 100:400] = 0.5  # exact ties straddling the threshold
    s[1, 2, :] = 0.0  # an all-zero row
    lens = torch.tensor([cap, cap * 2 // 3 + 1], dtype=torch.int32)
    for kk in (1, 64, min(cap, 16384)):
        for lw, gs in ((0, 1), (32, 1), (0, 2), (16, 4)):
            want = sparq.top_positions(s, lens, kk, lw, gs)
            got = sparq.top_positions(s.cuda(), lens.cuda(), kk, lw, gs)
            assert torch.equal(got.cpu(), want), f"k {kk} lw {lw} gs {gs}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
def test_cuda_matches_cpu_kernels():
    B, G, Hkv, D, cap = 2, 4, 2, 128, 260
    q, k, v, sl = _make("cpu", B, G * Hkv, Hkv, cap, D, torch.float16, [260, 100], _seed("xdev"))
    kt, vm = sparq.build(k, v, sl)
    kt_c, vm_c = sparq.build(k.cuda(), v.cuda(), sl.cuda())
    assert torch.equal(kt, kt_c.cpu())
    torch.testing.assert_close(vm, vm_c.cpu(), atol=1e-5, rtol=1e-5)
    for gs in (1, G):
        i1 = sparq.top_channels(q, 16, gs)
        assert torch.equal(i1, sparq.top_channels(q.cuda(), 16, gs).cpu())
        s = sparq.approx_scores(q, kt, i1, sl)
        s_c = sparq.approx_scores(q.cuda(), kt_c, i1.cuda(), sl.cuda())
        torch.testing.assert_close(s, s_c.cpu(), **SHAT_TOL)
        i2 = sparq.top_positions(s, sl, 50, 4, gs)
        assert torch.equal(i2, sparq.top_positions(s.cuda(), sl.cuda(), 50, 4, gs).cpu())
        o = sparq.sparse_attention(q, k, v, i2, s, vm, sl)
        o_c = sparq.sparse_attention(q.cuda(), k.cuda(), v.cuda(), i2.cuda(), s.cuda(), vm.cuda(), sl.cuda())
        _assert_close(o_c, o.double(), torch.float16, "cuda vs cpu")


def test_check_cache_finds_a_kt_of_other_keys():
    torch.manual_seed(0)
    k = torch.randn(2, 2, 40, 64)
    v = torch.randn_like(k)
    sl = torch.tensor([40, 17], dtype=torch.int32)
    kt, vm = sparq.build(k, v, sl)
    sparq.check_cache(k, v, kt, vm, sl)  # matches
    other, _ = sparq.build(torch.randn_like(k), v, sl)
    with pytest.raises(ValueError, match="kt does not match k at sequence 0"):
        sparq.check_cache(k, v, other, vm, sl)
    with pytest.raises(ValueError, match="v_mean does not match v"):
        sparq.check_cache(k, v, kt, vm + 1, sl)
