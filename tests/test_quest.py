"""Tests of the Quest ops (torch.ops.kvsparse.quest_*) against the float64
plain-PyTorch reference (kvsparse.reference).

CPU tests always run; CUDA tests are marked ``gpu`` and skipped without a GPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kvsparse
from kvsparse import quest
from kvsparse import reference as ref

from kvs_testing import DEVICES, DTYPES, HAS_GPU  # noqa: E402
from kvs_testing import assert_close as _assert_close  # noqa: E402
from kvs_testing import dirty as _dirty  # noqa: E402
from kvs_testing import make_qkv as _make  # noqa: E402
from kvs_testing import seed as _seed  # noqa: E402

P = 16  # page size used by most tests

# scores are float32 sums of D exact products (fp16/bf16 products are exact in float32)
SCORE_TOL = dict(atol=2e-3, rtol=1e-5)


def _assert_scores_close(actual, expected):
    a, e = actual.double().cpu(), expected.double().cpu()
    assert actual.dtype == torch.float32
    assert torch.equal(torch.isneginf(a), torch.isneginf(e)), "-inf pattern of scores differs"
    assert not torch.isnan(a).any()
    fin = torch.isfinite(e)
    torch.testing.assert_close(a[fin], e[fin], **SCORE_TOL)


#: the head dims beyond 64 and 128 (the CUDA kernels' padded lanes: 80, 96; a
#: whole warp per token: 256): a few dtypes and shapes each (GPU suite time)
NEW_D = (80, 96, 256)
NEW_D_DTYPES = [(torch.float32, "f32"), (torch.bfloat16, "bf16")]


def _cases(shapes, new_shapes):
    """(dtype, D, *shape) cases: every dtype and shape for D = 64 and 128,
    NEW_D_DTYPES and new_shapes for NEW_D."""
    out = [pytest.param(dt, D, *sh, id=f"{i}-D{D}-" + "-".join(map(str, sh)))
           for dt, i in zip(DTYPES, ["f32", "f16", "bf16"]) for D in (64, 128) for sh in shapes]
    out += [pytest.param(dt, D, *sh, id=f"{i}-D{D}-" + "-".join(map(str, sh)))
            for dt, i in NEW_D_DTYPES for D in NEW_D for sh in new_shapes]
    return out


# --------------------------------------------------------------------------
# the main sweep: every stage of the pipeline and the fused op vs the reference

LENS = {1: [203], 3: [211, 7, 64]}  # ragged; non-multiples of P; one shorter than a page
CAP = 211  # not a multiple of P: the last page of the cache is partial


@pytest.mark.parametrize("device", DEVICES)
# (G, B): every pair for D = 64 / 128; the largest group (MAXG 8: the most
# shared memory at D = 256) and a padded one (G = 3 in a MAXG 4 kernel) for NEW_D
@pytest.mark.parametrize("dtype,D,G,B", _cases([(G, B) for G in (1, 3, 4, 8) for B in (1, 3)], [(8, 1), (3, 3)]))
@pytest.mark.parametrize("budget", [72, 4096])  # 72: 4 pages (not a multiple of P); 4096 > cap
@pytest.mark.parametrize("mode", ["group", "head"])
def test_pipeline_matches_reference(device, dtype, D, G, B, budget, mode):
    Hkv = 2
    H = Hkv * G
    q, k, v, sl = _make(device, B, H, Hkv, CAP, D, dtype, LENS[B], _seed("pipe", dtype, D, G, B, budget, mode))
    group = mode == "group"
    Hs = Hkv if group else H
    max_pages = math.ceil(CAP / P)
    n_sel = min(budget // P, max_pages)

    _dirty(device)
    kmin, kmax = quest.page_metadata(k, sl, P)
    assert kmin.shape == (B, Hkv, max_pages, D) and kmin.dtype == dtype and kmin.device == k.device
    rmin, rmax = ref.quest_page_metadata_ref(k, sl, P)
    assert torch.equal(kmin.double(), rmin) and torch.equal(kmax.double(), rmax)

    scores = quest.page_scores(q, kmin, kmax, sl, P, mode=mode)
    assert scores.shape == (B, Hs, max_pages)
    _assert_scores_close(scores, ref.quest_scores_ref(q, kmin, kmax, sl, P, group))

    idx = quest.select_pages(scores, sl, P, budget)
    assert idx.shape == (B, Hs, n_sel) and idx.dtype == torch.int32
    assert torch.equal(idx.cpu(), ref.quest_select_ref(scores, sl, P, budget).cpu())

    scale = 1.0 / math.sqrt(D)
    out_sparse = quest.sparse_attention(q, k, v, idx, sl, P)
    assert out_sparse.shape == (B, H, D) and out_sparse.dtype == dtype
    _assert_close(out_sparse, ref.quest_sparse_attention_ref(q, k, v, idx, sl, P, scale), dtype, "sparse_attention")

    _dirty(device)
    out = quest.attention(q, k, v, kmin, kmax, sl, P, budget, mode=mode)
    assert out.shape == (B, H, D) and out.dtype == dtype
    expected = ref.quest_attention_ref(q, k, v, kmin, kmax, sl, P, budget, group, scale, scores=scores)
    _assert_close(out, expected, dtype, "attention")
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,D,G", _cases([(1,), (4,)], [(4,)]))
@pytest.mark.parametrize("mode", ["group", "head"])
def test_full_budget_equals_sdpa(device, dtype, D, G, mode):
    """With token_budget >= every length, Quest is dense attention on the valid prefix."""
    Hkv, cap = 2, 150
    H = Hkv * G
    lens = [150, 33, 5, 96]
    q, k, v, sl = _make(device, 4, H, Hkv, cap, D, dtype, lens, _seed("sdpa", dtype, D, G, mode))
    kmin, kmax = quest.page_metadata(k, sl, P)
    scale = 0.7 / math.sqrt(D)
    out = quest.attention(q, k, v, kmin, kmax, sl, P, token_budget=160, mode=mode, scale=scale)
    for b, L in enumerate(lens):
        qb = q[b : b + 1, :, None, :].double()
        kb = k[b : b + 1, :, :L].double()
        vb = v[b : b + 1, :, :L].double()
        exp_gqa = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)[0, :, 0]
        exp_rep = F.scaled_dot_product_attention(
            qb, kb.repeat_interleave(G, dim=1), vb.repeat_interleave(G, dim=1), scale=scale
        )[0, :, 0]
        torch.testing.assert_close(exp_gqa, exp_rep)
        _assert_close(out[b], exp_gqa, dtype, f"batch {b} (len {L})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_incremental_metadata_equals_scratch(device, dtype):
    B, Hkv, cap, D = 3, 2, 160, 64
    _, k, _, _ = _make(device, B, 2, Hkv, cap, D, dtype, [0] * B, _seed("incr", dtype))
    mp = math.ceil(cap / P)
    lens = torch.tensor([0, 5, 33], dtype=torch.int32)
    # a full build zeroes the empty pages; updates then rewrite only touched pages
    kmin, kmax = quest.page_metadata(k, lens.to(device), P)
    steps = [[1, 16, 7], [15, 1, 0], [40, 3, 17], [0, 50, 64], [1, 1, 1], [100, 84, 38]]
    for step in steps:
        start = lens.clone()
        lens = torch.clamp(lens + torch.tensor(step, dtype=torch.int32), max=cap).to(torch.int32)
        # poison exactly the pages this update must rewrite
        for b in range(B):
            lo, hi = int(start[b]) // P, -(-int(lens[b]) // P)
            if int(lens[b]) > int(start[b]):
                kmin[b, :, lo:hi] = float("nan")
                kmax[b, :, lo:hi] = float("nan")
        quest.update_metadata(k, kmin, kmax, start.to(device), lens.to(device), P)
        smin, smax = quest.page_metadata(k, lens.to(device), P)
        assert not torch.isnan(kmin.float()).any() and not torch.isnan(kmax.float()).any()
        assert torch.equal(kmin, smin) and torch.equal(kmax, smax), f"after appending {step} (lens {lens.tolist()})"
        rmin, rmax = ref.quest_page_metadata_ref(k, lens, P)
        assert torch.equal(kmin.double(), rmin) and torch.equal(kmax.double(), rmax)
    assert lens.tolist() == [157, cap, cap]  # reaches the full cache


@pytest.mark.parametrize("device", DEVICES)
def test_update_leaves_earlier_pages_alone(device):
    """Only pages from start_lens // P on are rewritten."""
    B, Hkv, cap, D = 2, 1, 96, 64
    _, k, _, _ = _make(device, B, 1, Hkv, cap, D, torch.float32, [0] * B, _seed("alone"))
    start = torch.tensor([40, 16], dtype=torch.int32, device=device)
    end = torch.tensor([50, 20], dtype=torch.int32, device=device)
    kmin, kmax = quest.page_metadata(k, start, P)
    kmin[0, :, 1] = 123.0  # page 1 of sequence 0 ends at token 32 <= 40: untouched
    kmax[1, :, 0] = -7.0  # page 0 of sequence 1 ends at token 16 <= 16: untouched
    quest.update_metadata(k, kmin, kmax, start, end, P)
    assert (kmin[0, :, 1] == 123.0).all() and (kmax[1, :, 0] == -7.0).all()
    smin, smax = quest.page_metadata(k, end, P)
    assert torch.equal(kmin[0, :, 2:], smin[0, :, 2:]) and torch.equal(kmax[1, :, 1:], smax[1, :, 1:])


# --------------------------------------------------------------------------
# selection rules


@pytest.mark.parametrize("device", DEVICES)
def test_select_rules_exact_ties(device):
    Pg = 4
    big = 100.0  # scores of empty pages must be ignored whatever they are
    rows = [
        # (seq_len, scores[8]) ; n_sel = 12 // 4 = 3
        (32, [1, 5, 5, 5, 0, 0, 0, 9], [1, 2, 7]),  # ties -> lower index; last page always
        (32, [9, 9, 1, 1, 1, 1, 1, -5], [0, 1, 7]),  # last page kept although it scores lowest
        (29, [2, 2, 2, 2, 2, 2, 2, 2], [0, 1, 7]),  # all tied; partial last page
        (26, [0, 3, 0, 3, 0, 3, 1, big], [1, 3, 6]),  # np = 7: page 7 empty, last page is 6
        (9, [0, 0, 0, big, big, big, big, big], [0, 1, 2]),  # np = 3 <= n_sel: all pages
        (5, [0, 0, big, big, big, big, big, big], [0, 1, -1]),  # np = 2
        (3, [0, big, big, big, big, big, big, big], [0, -1, -1]),  # len < page size
        (0, [big] * 8, [-1, -1, -1]),  # empty sequence
        (13, [-1, -1, -1, -1, big, big, big, big], [0, 1, 3]),  # np = 4: last page 3 + two of 0..2 (tied)
    ]
    B = len(rows)
    scores = torch.tensor([[r[1], r[1]] for r in rows], dtype=torch.float32, device=device)  # Hs = 2
    sl = torch.tensor([r[0] for r in rows], dtype=torch.int32, device=device)
    idx = quest.select_pages(scores, sl, page_size=Pg, token_budget=12)
    expected = torch.tensor([[r[2], r[2]] for r in rows], dtype=torch.int32)
    assert idx.shape == (B, 2, 3)
    assert torch.equal(idx.cpu(), expected)
    assert torch.equal(idx.cpu(), ref.quest_select_ref(scores, sl, Pg, 12).cpu())
    # a budget larger than the cache caps n_sel at max_pages
    idx = quest.select_pages(scores, sl, page_size=Pg, token_budget=1000)
    assert idx.shape == (B, 2, 8)
    assert torch.equal(idx.cpu(), ref.quest_select_ref(scores, sl, Pg, 1000).cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["group", "head"])
def test_fused_ties_go_to_lower_pages(device, mode):
    """Identical pages give exactly tied scores; the fused op must pick the lowest pages."""
    B, G, Hkv, D, npg = 2, 4, 2, 64, 12
    cap = npg * P
    q, k, v, _ = _make(device, B, G * Hkv, Hkv, cap, D, torch.float32, [0] * B, _seed("ties", mode))
    k = k[:, :, :P].repeat(1, 1, npg, 1).contiguous()  # every page has the same keys
    sl = torch.tensor([cap, cap - 5], dtype=torch.int32, device=device)
    kmin, kmax = quest.page_metadata(k, sl, P)
    budget = 4 * P
    scores = quest.page_scores(q, kmin, kmax, sl, P, mode=mode)
    idx = quest.select_pages(scores, sl, P, budget)
    assert (idx[:, :, :3].cpu() == torch.tensor([0, 1, 2], dtype=torch.int32)).all()
    assert (idx[:, :, 3].cpu() == torch.tensor([npg - 1, npg - 1], dtype=torch.int32)[:, None]).all()
    out = quest.attention(q, k, v, kmin, kmax, sl, P, budget, mode=mode)
    expected = ref.quest_sparse_attention_ref(q, k, v, idx, sl, P)
    _assert_close(out, expected, torch.float32, "tied attention")


@pytest.mark.parametrize("device", DEVICES)
def test_head_and_group_modes(device):
    """Head mode selects per query head, group mode shares a selection per KV head."""
    B, G, Hkv, D, cap = 1, 4, 2, 64, 256
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, torch.float32, [250], _seed("modes"))
    kmin, kmax = quest.page_metadata(k, sl, P)
    sh = quest.page_scores(q, kmin, kmax, sl, P, mode="head")
    sg = quest.page_scores(q, kmin, kmax, sl, P, mode="group")
    assert sh.shape == (1, 8, 16) and sg.shape == (1, 2, 16)
    torch.testing.assert_close(sg, sh.view(1, Hkv, G, 16).sum(2), atol=1e-3, rtol=1e-5)
    for mode, s in (("head", sh), ("group", sg)):
        out = quest.attention(q, k, v, kmin, kmax, sl, P, 64, mode=mode)
        exp = ref.quest_attention_ref(q, k, v, kmin, kmax, sl, P, 64, mode == "group", scores=s)
        _assert_close(out, exp, torch.float32, mode)
    # the two modes choose different page sets on random data
    oh = quest.attention(q, k, v, kmin, kmax, sl, P, 64, mode="head")
    og = quest.attention(q, k, v, kmin, kmax, sl, P, 64, mode="group")
    assert not torch.allclose(oh, og)


# --------------------------------------------------------------------------
# edge cases and poison


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_cache_tail_poison_is_ignored(device, dtype):
    """NaN / inf in k and v past seq_lens never reaches an output."""
    B, G, Hkv, D, cap = 3, 2, 2, 64, 100
    lens = [100, 41, 3]
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, dtype, lens, _seed("tail", dtype))
    kc, vc = k.clone(), v.clone()
    for b, L in enumerate(lens):
        k[b, :, L:] = float("nan")
        v[b, :, L:] = float("inf")
    _dirty(device)
    kmin, kmax = quest.page_metadata(k, sl, P)
    assert not torch.isnan(kmin.float()).any() and not torch.isnan(kmax.float()).any()
    rmin, rmax = ref.quest_page_metadata_ref(kc, sl, P)
    assert torch.equal(kmin.double(), rmin) and torch.equal(kmax.double(), rmax)
    for mode in ("group", "head"):
        _dirty(device)
        s = quest.page_scores(q, kmin, kmax, sl, P, mode=mode)
        assert not torch.isnan(s).any()
        idx = quest.select_pages(s, sl, P, 48)
        o1 = quest.sparse_attention(q, k, v, idx, sl, P)
        o2 = quest.attention(q, k, v, kmin, kmax, sl, P, 48, mode=mode)
        exp = ref.quest_sparse_attention_ref(q, kc, vc, idx, sl, P)
        _assert_close(o1, exp, dtype, "sparse_attention")
        _assert_close(o2, exp, dtype, "attention")


@pytest.mark.parametrize("device", DEVICES)
def test_zero_length_and_empty_rows(device):
    B, G, Hkv, D, cap = 3, 2, 2, 64, 64
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, torch.float32, [0, 40, 1], _seed("zero"))
    _dirty(device)
    kmin, kmax = quest.page_metadata(k, sl, P)
    assert (kmin[0] == 0).all() and (kmax[0] == 0).all()  # empty pages are zeros
    assert (kmin[2, :, 1:] == 0).all() and torch.equal(kmin[2, :, 0], k[2, :, 0])
    _dirty(device)
    out = quest.attention(q, k, v, kmin, kmax, sl, P, 32)
    assert (out[0] == 0).all(), "a length-0 sequence gives zeros"
    torch.testing.assert_close(out[2], v[2, :, 0].repeat_interleave(G, dim=0))  # one token: out = v[0]
    s = quest.page_scores(q, kmin, kmax, sl, P)
    assert torch.isneginf(s[0]).all()
    idx = quest.select_pages(s, sl, P, 32)
    assert (idx[0] == -1).all()
    # page_idx rows full of -1 give zeros
    idx_none = torch.full((B, Hkv, 2), -1, dtype=torch.int32, device=device)
    _dirty(device)
    out = quest.sparse_attention(q, k, v, idx_none, sl, P)
    assert (out == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_attention_head_rows_and_scale(device):
    """page_idx with H rows (head mode) and a custom scale, pages chosen by hand."""
    B, G, Hkv, D, cap = 2, 3, 1, 64, 80
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, torch.float16, [80, 70], _seed("hand"))
    idx = torch.tensor(
        [[[0, 4, -1], [1, 2, 3], [-1, -1, 4]], [[2, 4, -1], [0, -1, -1], [3, 4, -1]]], dtype=torch.int32, device=device
    )
    out = quest.sparse_attention(q, k, v, idx, sl, P, scale=0.05)
    _assert_close(out, ref.quest_sparse_attention_ref(q, k, v, idx, sl, P, 0.05), torch.float16, "head rows")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 5, 32])
def test_other_page_sizes(device, page_size):
    B, G, Hkv, D, cap = 2, 2, 2, 64, 67
    q, k, v, sl = _make(device, B, G * Hkv, Hkv, cap, D, torch.float32, [67, 30], _seed("ps", page_size))
    kmin, kmax = quest.page_metadata(k, sl, page_size)
    rmin, rmax = ref.quest_page_metadata_ref(k, sl, page_size)
    assert torch.equal(kmin.double(), rmin) and torch.equal(kmax.double(), rmax)
    budget = 2 * page_size + 1
    s = quest.page_scores(q, kmin, kmax, sl, page_size)
    out = quest.attention(q, k, v, kmin, kmax, sl, page_size, budget)
    exp = ref.quest_attention_ref(q, k, v, kmin, kmax, sl, page_size, budget, True, scores=s)
    _assert_close(out, exp, torch.float32, f"page_size {page_size}")


# --------------------------------------------------------------------------
# opcheck


def _small_args(device):
    g = torch.Generator().manual_seed(_seed("opcheck"))
    B, H, Hkv, cap, D, Pg = 2, 4, 2, 37, 64, 8
    q = torch.randn(B, H, D, generator=g).to(device)
    k = torch.randn(B, Hkv, cap, D, generator=g).to(device)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(device)
    sl = torch.tensor([37, 11], dtype=torch.int32, device=device)
    start = torch.tensor([30, 3], dtype=torch.int32, device=device)
    kmin, kmax = torch.ops.kvsparse.quest_page_metadata(k, start, Pg)
    scores = torch.ops.kvsparse.quest_page_scores(q, kmin, kmax, sl, Pg, True)
    idx = torch.ops.kvsparse.quest_select_pages(scores, sl, Pg, 16)
    return dict(q=q, k=k, v=v, sl=sl, start=start, kmin=kmin, kmax=kmax, scores=scores, idx=idx, P=Pg)


OPCHECK_CASES = {
    "quest_page_metadata": lambda a: (a["k"], a["sl"], a["P"]),
    "quest_update_metadata": lambda a: (a["k"], a["kmin"], a["kmax"], a["start"], a["sl"], a["P"]),
    "quest_page_scores": lambda a: (a["q"], a["kmin"], a["kmax"], a["sl"], a["P"], False),
    "quest_select_pages": lambda a: (a["scores"], a["sl"], a["P"], 20),
    "quest_sparse_attention": lambda a: (a["q"], a["k"], a["v"], a["idx"], a["sl"], a["P"], 0.125),
    "quest_attention": lambda a: (a["q"], a["k"], a["v"], a["kmin"], a["kmax"], a["sl"], a["P"], 16, True, 0.125),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", list(OPCHECK_CASES))
def test_opcheck(device, op_name):
    args = OPCHECK_CASES[op_name](_small_args(device))
    op = getattr(torch.ops.kvsparse, op_name).default
    torch.library.opcheck(op, args)


def test_version_and_has_cuda():
    assert kvsparse.__version__ == "0.1.0"
    assert isinstance(kvsparse.has_cuda(), bool)


# --------------------------------------------------------------------------
# bad inputs


def _bad_base(device, D=64):
    B, H, Hkv, cap = 2, 4, 2, 40
    q = torch.randn(B, H, D, device=device)
    k = torch.randn(B, Hkv, cap, D, device=device)
    v = torch.randn(B, Hkv, cap, D, device=device)
    sl = torch.tensor([40, 9], dtype=torch.int32, device=device)
    kmin, kmax = quest.page_metadata(k, sl, P) if D in kvsparse.hf.CUDA_HEAD_DIMS or device == "cpu" else (None, None)
    return q, k, v, sl, kmin, kmax


def _attn(q, k, v, kmin, kmax, sl, **kw):
    return quest.attention(q, k, v, kmin, kmax, sl, **kw)


def _bad_cases():
    """(name, builder(device) -> callable, exception, match, cpu_only)."""
    cases = []

    def add(name, fn, exc, match, cpu_only=False):
        cases.append(pytest.param(fn, exc, match, cpu_only, id=name))

    add("q_float64", lambda q, k, v, sl, a, b: _attn(q.double(), k, v, a, b, sl), TypeError, r"\bq\b")
    add("k_int", lambda q, k, v, sl, a, b: quest.page_metadata(k.int(), sl), TypeError, r"\bk\b")
    add("k_dtype_mix", lambda q, k, v, sl, a, b: _attn(q, k.half(), v, a, b, sl), TypeError, r"\bk\b")
    add("v_dtype_mix", lambda q, k, v, sl, a, b: _attn(q, k, v.bfloat16(), a, b, sl), TypeError, r"\bv\b")
    add("kmin_dtype_mix", lambda q, k, v, sl, a, b: _attn(q, k, v, a.half(), b, sl), TypeError, "kmin")
    add("seq_lens_int64", lambda q, k, v, sl, a, b: _attn(q, k, v, a, b, sl.long()), TypeError, "seq_lens")
    add("scores_f16", lambda q, k, v, sl, a, b: quest.select_pages(torch.zeros(2, 2, 3, device=q.device, dtype=torch.half), sl, P, 32), TypeError, "scores")
    add("page_idx_int64", lambda q, k, v, sl, a, b: quest.sparse_attention(q, k, v, torch.zeros(2, 2, 1, dtype=torch.long, device=q.device), sl), TypeError, "page_idx")
    add("start_lens_f32", lambda q, k, v, sl, a, b: quest.update_metadata(k, a, b, sl.float(), sl), TypeError, "start_lens")
    add("q_rank", lambda q, k, v, sl, a, b: _attn(q[:, :, None], k, v, a, b, sl), ValueError, r"\bq\b")
    add("k_rank", lambda q, k, v, sl, a, b: quest.page_metadata(k[0], sl), ValueError, r"\bk\b")
    add("seq_lens_rank", lambda q, k, v, sl, a, b: _attn(q, k, v, a, b, sl[:, None]), ValueError, "seq_lens")
    add("seq_lens_shape", lambda q, k, v, sl, a, b: _attn(q, k, v, a, b, sl[:1]), ValueError, "seq_lens")
    add("v_shape", lambda q, k, v, sl, a, b: _attn(q, k, v[:, :, :30].contiguous(), a, b, sl), ValueError, r"\bv\b")
    add("kmin_pages", lambda q, k, v, sl, a, b: _attn(q, k, v, a[:, :, :2].contiguous(), b, sl), ValueError, "kmin")
    add("kmax_D", lambda q, k, v, sl, a, b: quest.page_scores(q, a, b[..., :32].contiguous(), sl), ValueError, "kmax")
    add("page_idx_rows", lambda q, k, v, sl, a, b: quest.sparse_attention(q, k, v, torch.zeros(2, 3, 1, dtype=torch.int32, device=q.device), sl), ValueError, "page_idx")
    add("q_noncontig", lambda q, k, v, sl, a, b: _attn(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, a, b, sl), ValueError, r"\bq\b")
    add("k_noncontig", lambda q, k, v, sl, a, b: quest.page_metadata(k.transpose(2, 3).contiguous().transpose(2, 3), sl), ValueError, r"\bk\b")
    add("kmin_noncontig", lambda q, k, v, sl, a, b: quest.update_metadata(k, a.transpose(2, 3).contiguous().transpose(2, 3), b, sl, sl), ValueError, "kmin")
    add("budget_lt_page", lambda q, k, v, sl, a, b: _attn(q, k, v, a, b, sl, token_budget=P - 1), ValueError, "token_budget")
    add("select_budget_lt_page", lambda q, k, v, sl, a, b: quest.select_pages(torch.zeros(2, 2, 3, device=q.device), sl, P, 8), ValueError, "token_budget")
    add("page_size_0", lambda q, k, v, sl, a, b: quest.page_metadata(k, sl, 0), ValueError, "page_size")
    add("H_not_multiple", lambda q, k, v, sl, a, b: _attn(q[:, :3].contiguous(), k, v, a, b, sl), ValueError, "Hkv")
    add("bad_mode", lambda q, k, v, sl, a, b: _attn(q, k, v, a, b, sl, mode="token"), ValueError, "mode")
    add("bad_mode_scores", lambda q, k, v, sl, a, b: quest.page_scores(q, a, b, sl, mode=None), ValueError, "mode")
    add("seq_lens_over_cap", lambda q, k, v, sl, a, b: _attn(q, k, v, a, b, sl + 1), ValueError, "seq_lens", True)
    add("seq_lens_negative", lambda q, k, v, sl, a, b: quest.page_metadata(k, sl - 10), ValueError, "seq_lens", True)
    add("start_after_end", lambda q, k, v, sl, a, b: quest.update_metadata(k, a, b, sl, sl - 1), ValueError, "start_lens", True)
    add("page_idx_range", lambda q, k, v, sl, a, b: quest.sparse_attention(q, k, v, torch.full((2, 2, 1), 3, dtype=torch.int32, device=q.device), sl), ValueError, "page_idx", True)
    add("page_idx_neg", lambda q, k, v, sl, a, b: quest.sparse_attention(q, k, v, torch.full((2, 2, 1), -2, dtype=torch.int32, device=q.device), sl), ValueError, "page_idx", True)
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn,exc,match,cpu_only", _bad_cases())
def test_bad_inputs(device, fn, exc, match, cpu_only):
    if cpu_only and device != "cpu":
        pytest.skip("values are trusted on CUDA (no host sync)")
    q, k, v, sl, kmin, kmax = _bad_base(device)
    with pytest.raises(exc, match=match):
        fn(q, k, v, sl, kmin, kmax)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_head_dim(device):
    D = 36 if device == "cpu" else 72  # CPU: D % 8 != 0; CUDA: not 64, 80, 96, 128 or 256
    k = torch.randn(1, 1, 16, D, device=device)
    sl = torch.tensor([16], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        quest.page_metadata(k, sl)
    q = torch.randn(1, 1, D, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        quest.sparse_attention(q, k, k, torch.zeros(1, 1, 1, dtype=torch.int32, device=device), sl)


def test_cpu_big_head_dim_rejected():
    k = torch.randn(1, 1, 4, 264)
    with pytest.raises(ValueError, match="head_dim"):
        quest.page_metadata(k, torch.tensor([4], dtype=torch.int32))


# --------------------------------------------------------------------------
# CUDA only


@pytest.mark.parametrize("fn_name", ["attention", "page_metadata"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
def test_cuda_device_mismatch(fn_name):
    q, k, v, sl, kmin, kmax = _bad_base("cuda")
    with pytest.raises(RuntimeError, match="seq_lens"):
        if fn_name == "attention":
            _attn(q, k, v, kmin, kmax, sl.cpu())
        else:
            quest.page_metadata(k, sl.cpu())
    with pytest.raises(RuntimeError, match=r"\bk\b"):
        _attn(q, k.cpu(), v, kmin, kmax, sl)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("mode", ["group", "head"])
def test_cuda_graph_capture(dtype, mode):
    B, G, Hkv, D, cap = 3, 4, 2, 128, 300
    q, k, v, sl = _make("cuda", B, G * Hkv, Hkv, cap, D, dtype, [300, 129, 7], _seed("graph", dtype, mode))
    kmin, kmax = quest.page_metadata(k, sl, P)
    budget = 64
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up
            quest.attention(q, k, v, kmin, kmax, sl, P, budget, mode=mode)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quest.attention(q, k, v, kmin, kmax, sl, P, budget, mode=mode)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, quest.attention(q, k, v, kmin, kmax, sl, P, budget, mode=mode), atol=0, rtol=0)
    # new query and new lengths, written in place, then replay
    g = torch.Generator().manual_seed(_seed("graph2", dtype, mode))
    q.copy_(torch.randn(q.shape, generator=g).to(q))
    new_sl = torch.tensor([250, 200, 1], dtype=torch.int32, device="cuda")
    quest.update_metadata(k, kmin, kmax, torch.minimum(sl, new_sl), new_sl, P)
    sl.copy_(new_sl)
    graph.replay()
    torch.cuda.synchronize()
    eager = quest.attention(q, k, v, kmin, kmax, sl, P, budget, mode=mode)
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    s = quest.page_scores(q, kmin, kmax, sl, P, mode=mode)
    exp = ref.quest_attention_ref(q, k, v, kmin, kmax, sl, P, budget, mode == "group", scores=s)
    _assert_close(out, exp, dtype, "graph replay")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
def test_cuda_matches_cpu_kernels():
    """Same inputs on both devices: metadata and selection agree exactly."""
    B, G, Hkv, D, cap = 2, 4, 2, 128, 260
    q, k, v, sl = _make("cpu", B, G * Hkv, Hkv, cap, D, torch.float16, [260, 100], _seed("xdev"))
    kmin, kmax = quest.page_metadata(k, sl, P)
    kmin_c, kmax_c = quest.page_metadata(k.cuda(), sl.cuda(), P)
    assert torch.equal(kmin, kmin_c.cpu()) and torch.equal(kmax, kmax_c.cpu())
    s = quest.page_scores(q, kmin, kmax, sl, P)
    idx = quest.select_pages(s, sl, P, 96)
    idx_c = quest.select_pages(s.cuda(), sl.cuda(), P, 96)
    assert torch.equal(idx, idx_c.cpu())
    o = quest.attention(q, k, v, kmin, kmax, sl, P, 96)
    o_c = quest.attention(q.cuda(), k.cuda(), v.cuda(), kmin_c, kmax_c, sl.cuda(), P, 96)
    _assert_close(o_c, o.double(), torch.float16, "cuda vs cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
@pytest.mark.parametrize("max_pages", [700, 1900, 3000, 7000, 12000, 20000])
def test_cuda_select_large_matches_cpu(max_pages):
    """The GPU selection has a register-resident path per size class (up to 16K
    candidate pages) and a streaming path beyond: all must pick what the CPU picks."""
    g = torch.Generator().manual_seed(max_pages)
    B, Hs, Pg = 2, 3, 1
    scores = torch.randn(B, Hs, max_pages, generator=g)
    scores[0, 0, 10:60] = 2.5  # exact ties straddling the threshold
    lens = torch.tensor([max_pages, max_pages * 2 // 3 + 1], dtype=torch.int32)
    for budget in (1, 64, 1000):
        want = quest.select_pages(scores, lens, Pg, budget)
        got = quest.select_pages(scores.cuda(), lens.cuda(), Pg, budget)
        assert torch.equal(got.cpu(), want), f"budget {budget}"


# ---------------------------------------------------------------- GQA selection


def _round_robin(s, n):
    """Pages taken by rank, every head's best first (reference of "union")."""
    G, P = s.shape
    ranked = [sorted(range(P), key=lambda p: (-s[g, p], p)) for g in range(G)]
    out = []
    for r in range(P):
        for g in range(G):
            p = ranked[g][r]
            if p not in out and len(out) < n:
                out.append(p)
    return out


@pytest.mark.parametrize("how", quest.GROUP_MODES)
def test_combine_scores_matches_reference(how):
    _seed(3)
    B, Hkv, G, P = 2, 3, 4, 23
    s = torch.randn(B, Hkv * G, P, dtype=torch.float32) * 4
    s[1, :, 17:] = float("-inf")  # empty pages of a shorter sequence
    got = quest.combine_scores(s, Hkv, how, scale=0.7)
    assert got.shape == (B, Hkv, P) and got.dtype == torch.float32
    assert torch.isneginf(got[1, :, 17:]).all() and torch.isfinite(got[0]).all()
    sd = s.double().view(B, Hkv, G, P)
    if how == "group":
        torch.testing.assert_close(got[0], sd[0].sum(1).float())
    elif how == "max":
        torch.testing.assert_close(got[0], sd[0].amax(1).float())
    elif how == "softmax":
        torch.testing.assert_close(got[0], torch.softmax(0.7 * sd[0], -1).sum(1).float())
    elif how == "softmax_max":
        torch.testing.assert_close(got[0], torch.softmax(0.7 * sd[0], -1).amax(1).float())
    else:  # the top pages of the combined score are a round-robin union: the best per-head ranks
        for b, n_pages in ((0, P), (1, 17)):
            for hk in range(Hkv):
                sc = sd[b, hk, :, :n_pages]
                rank = sc.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # per-head rank of each page
                best = rank.amin(0)
                top = got[b, hk, :n_pages].double().argsort(descending=True, stable=True)[:6]
                assert sorted(best[top].tolist()) == sorted(best.tolist())[:6]
                assert set(_round_robin(sc.numpy(), 4)) <= set(top.tolist())  # every head's best page


@pytest.mark.parametrize("how", quest.GROUP_MODES)
def test_combine_scores_nan_stays_on_its_page(how):
    """NaN policy: a NaN bound makes its page's combined score NaN (selected
    first by select_pages) and leaves the other pages' scores finite."""
    _seed(4)
    s = torch.randn(1, 6, 9)
    s[0, 4, 5] = float("nan")  # KV head 1 (heads 3..5), page 5
    got = quest.combine_scores(s, 2, how, scale=0.5)
    assert torch.isnan(got[0, 1, 5]) and torch.isfinite(got[0, 1, torch.arange(9) != 5]).all()
    assert torch.isfinite(got[0, 0]).all()
    idx = quest.select_pages(got, torch.tensor([9 * 16], dtype=torch.int32), 16, 32)
    assert 5 in idx[0, 1].tolist()


def test_combine_scores_bad_input():
    s = torch.randn(1, 4, 5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        quest.combine_scores(s, 3)
    with pytest.raises(ValueError, match="how"):
        quest.combine_scores(s, 2, "mean")
    with pytest.raises(ValueError, match="scores"):
        quest.combine_scores(s[0], 2)
