"""Quest selection over a QAQ-packed cache: the sparse attention op
(``kvsparse.qaq.sparse_attention`` / ``torch.ops.kvsparse.qaq_sparse_attention``)
against the float64 reference "Quest over the dequantized cache"
(:func:`kvsparse.reference.qaq_sparse_attention_ref`, and for the pages
:func:`kvsparse.reference.quest_sparse_attention_ref` over the dequantized K / V).

CPU tests always run; CUDA tests are marked ``gpu`` and skipped without a GPU.
"""
import pytest
import torch

from kvsparse import qaq, quest
from kvsparse import reference as ref

from kvs_testing import ATTN_TOL, DEVICES, DT_IDS, DTYPES  # noqa: E402
from kvs_testing import dirty as _dirty  # noqa: E402
from kvs_testing import seed as _seed  # noqa: E402

from test_qaq import _fill, _rand_widths, _randn  # noqa: E402


def _pages(B, Hkv, cap, P, n_sel, lens, seed, pad=True):
    """Random distinct pages per (b, hk) row, ascending, some rows -1 padded,
    among them pages past the sequence's end (they select nothing)."""
    g = torch.Generator().manual_seed(seed)
    mp = -(-cap // P)
    out = torch.full((B, Hkv, n_sel), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            k = n_sel - (int(torch.randint(0, 2, (1,), generator=g)) if pad else 0)
            sel = torch.randperm(mp, generator=g)[:k].sort().values
            out[b, h, :k] = sel.to(torch.int32)
    return out


def _check(device, q, ks, vs, pidx, sl, P, scale=None):
    _dirty(device)
    out, pm = qaq.sparse_attention(q, ks, vs, pidx.to(device), sl, P, scale=scale, return_p_max=True)
    Hkv, D = ks.num_kv_heads, ks.head_dim
    kd = ref.qaq_dequantize_ref(*ks.tensors(), sl, Hkv, D)
    vd = ref.qaq_dequantize_ref(*vs.tensors(), sl, Hkv, D)
    exp, pexp = ref.qaq_sparse_attention_ref(q, kd, vd, pidx, sl, P, scale)
    atol, rtol = ATTN_TOL[q.dtype]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert pm.shape == (q.shape[0], Hkv, pidx.shape[2] * P) and pm.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), exp, atol=atol, rtol=rtol)
    torch.testing.assert_close(pm.double().cpu(), pexp, atol=1e-6, rtol=1e-4)
    # the same as Quest's own sparse attention reference over the dequantized cache
    qexp = ref.quest_sparse_attention_ref(q.cpu(), kd, vd, pidx, sl.cpu(), P, scale)
    torch.testing.assert_close(out.double().cpu(), qexp, atol=atol, rtol=rtol)
    return out, pm


#: head dims beyond 64 and 128: 96 and 256 on both devices, 80 on the CPU only
#: (the QAQ attention on CUDA refuses it); a few dtypes and shapes each (GPU suite time)
_NEW_D_CASES = [pytest.param(dt, D, G, B, P, id=f"{i}-D{D}-{G}-{B}-{P}")
                for dt, i in [(torch.float32, "f32"), (torch.bfloat16, "bf16")] for D in (80, 96, 256)
                for G, B, P in [(4, 1, 16), (1, 3, 8)]]
_CASES = [pytest.param(dt, D, G, B, P, id=f"{i}-D{D}-{G}-{B}-{P}")
          for dt, i in zip(DTYPES, DT_IDS) for D in (64, 128) for G in (1, 4) for B in (1, 3) for P in (16, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,D,G,B,P", _CASES + _NEW_D_CASES)
def test_sparse_attention_matches_quest_over_dequantized(device, dtype, D, G, B, P):
    if device == "cuda" and D == 80:
        pytest.skip("the QAQ attention on CUDA takes head_dim 64, 96, 128 or 256")
    Hkv, cap = 2, 101
    lens = {1: [101], 3: [101, 9, 60]}[B]  # not multiples of the page size
    seed = _seed("qq", dtype, D, G, B, P)
    shared = seed % 2 == 0
    wk = _rand_widths(B, 1 if shared else Hkv, cap, seed + 1)
    wv = _rand_widths(B, Hkv, cap, seed + 2, (1, 2, 4, 8))
    ks, _, sl = _fill(device, B, Hkv, cap, D, dtype, lens, wk, seed + 3, shared=shared, alpha=0.03)
    vs, _, _ = _fill(device, B, Hkv, cap, D, dtype, lens, wv, seed + 4, alpha=0.03)
    q = _randn((B, G * Hkv, D), torch.Generator().manual_seed(seed + 5), dtype, device) * 2
    pidx = _pages(B, Hkv, cap, P, 4, lens, seed + 6)
    _check(device, q, ks, vs, pidx, sl, P)
    _check(device, q, ks, vs, pidx, sl, P, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_every_page_is_the_dense_qaq_attention(device, dtype):
    """Selecting every page (in order) gives qaq.attention's output and p_max."""
    B, Hkv, G, cap, D, P = 2, 2, 3, 16 * 20 + 7, 128, 16
    seed = _seed("qq-all", dtype)
    lens = [cap, 200]
    ks, _, sl = _fill(device, B, Hkv, cap, D, dtype, lens, _rand_widths(B, 1, cap, seed), seed + 1, shared=True,
                      alpha=0.02)
    vs, _, _ = _fill(device, B, Hkv, cap, D, dtype, lens, _rand_widths(B, Hkv, cap, seed + 2), seed + 3)
    q = _randn((B, G * Hkv, D), torch.Generator().manual_seed(seed + 4), dtype, device)
    mp = -(-cap // P)
    pidx = torch.arange(mp, dtype=torch.int32).view(1, 1, mp).expand(B, Hkv, mp).contiguous()
    out, pm = _check(device, q, ks, vs, pidx, sl, P)
    dense, dpm = qaq.attention(q, ks, vs, sl, return_p_max=True)
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.double(), dense.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(pm[..., :cap], dpm, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_quest_selection_then_sparse_attention(device):
    """The decode step of quest_qaq: page bounds from the unquantized keys,
    Quest's scores and selection, then the packed sparse attention, against
    Quest's float64 reference over the dequantized cache with the same pages."""
    B, Hkv, G, cap, D, P, budget = 2, 2, 4, 200, 64, 16, 64
    dtype = torch.float32
    lens = [200, 77]
    ks, x, sl = _fill(device, B, Hkv, cap, D, dtype, lens, _rand_widths(B, Hkv, cap, 3, (4, 8)), 4)
    vs, _, _ = _fill(device, B, Hkv, cap, D, dtype, lens, _rand_widths(B, Hkv, cap, 5, (2, 4)), 6)
    q = torch.randn(B, G * Hkv, D, generator=torch.Generator().manual_seed(7)).to(device)
    kmin, kmax = quest.page_metadata(x, sl, P)
    scores = quest.page_scores(q, kmin, kmax, sl, P, "group")
    pidx = quest.select_pages(scores, sl, P, budget)
    out, _ = _check(device, q, ks, vs, pidx.cpu(), sl, P)
    assert out.isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_and_nan(device):
    B, Hkv, cap, D, P = 2, 2, 40, 64, 16
    w = torch.full((B, Hkv, cap), 4, dtype=torch.uint8)
    ks, _, _ = _fill(device, B, Hkv, cap, D, torch.float32, [40, 40], w, 1)
    sl = torch.tensor([0, 33], dtype=torch.int32, device=device)
    q = torch.randn(B, 4, D, device=device)
    pidx = torch.tensor([[[0, 1], [-1, -1]], [[-1, -1], [2, -1]]], dtype=torch.int32, device=device)
    out, pm = qaq.sparse_attention(q, ks, ks, pidx, sl, P, return_p_max=True)
    # sequence 0 is empty, (1, head 0) selects nothing: zeros; (1, head 1): page 2 holds token 32 only
    assert (out[0] == 0).all() and (pm[0] == 0).all()
    assert (out[1, :2] == 0).all() and (pm[1, 0] == 0).all()
    assert pm[1, 1, 0].item() == pytest.approx(1.0) and (pm[1, 1, 1:] == 0).all()
    qn = q.clone()
    qn[1, 3, 5] = float("nan")
    out = qaq.sparse_attention(qn, ks, ks, pidx, sl, P)
    assert out[1, 3].isnan().all() and out[1, 2].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    B, Hkv, cap, D, P = 1, 2, 40, 64, 16
    ks, _, sl = _fill(device, B, Hkv, cap, D, torch.float32, [40], torch.full((B, Hkv, cap), 4, dtype=torch.uint8), 1)
    q = torch.randn(B, 4, D, device=device)
    good = torch.zeros(B, Hkv, 2, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="page_idx"):
        qaq.sparse_attention(q, ks, ks, good.long(), sl, P)
    with pytest.raises(ValueError, match="page_idx"):
        qaq.sparse_attention(q, ks, ks, good[:, :1], sl, P)  # one list for two KV heads
    with pytest.raises(ValueError, match="n_sel"):
        qaq.sparse_attention(q, ks, ks, torch.zeros(B, Hkv, 4, dtype=torch.int32, device=device), sl, P)
    with pytest.raises(ValueError, match="page_size"):
        qaq.sparse_attention(q, ks, ks, good, sl, 0)
    if device == "cpu":
        with pytest.raises(ValueError, match="page_idx value"):
            qaq.sparse_attention(q, ks, ks, torch.full((B, Hkv, 2), 3, dtype=torch.int32), sl, P)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    B, Hkv, cap, D, P = 2, 2, 40, 64, 16
    w = _rand_widths(B, Hkv, cap, 9, (2, 4, 8))
    ks, _, sl = _fill(device, B, Hkv, cap, D, torch.float16, [40, 21], w, 10)
    q = torch.randn(B, 4, D, device=device, dtype=torch.float16)
    pidx = torch.tensor([[[0, 2], [1, -1]], [[0, 1], [1, 2]]], dtype=torch.int32, device=device)
    for want in (False, True):
        torch.library.opcheck(torch.ops.kvsparse.qaq_sparse_attention,
                              (q, *ks.tensors(), *ks.tensors(), pidx, sl, Hkv, D, P, 0.125, want))


class _Layer:
    """The geometry a side index reads from its layer."""

    def __init__(self, B, H, D, dtype, cap):
        self.batch_size, self.num_heads, self.head_dim = B, H, D
        self.dtype, self.device, self.capacity = dtype, torch.device("cpu"), 0
        self.seq_lens = torch.zeros(B, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("P", [16, 5])
def test_page_bounds_follow_the_arriving_keys(dtype, P):
    """quest_qaq's page bounds (QuestBounds), fed by prefills (with padding,
    a second one continuing mid-page) and decode tokens, equal the bounds of
    every key stored so far (the float64 reference over the unquantized keys)."""
    from kvsparse.methods.quest_qaq import QuestBounds

    B, H, D, cap = 3, 2, 8, 64
    g = torch.Generator().manual_seed(_seed("bounds", dtype, P))
    keys = _randn((B, H, cap, D), g, dtype, "cpu")
    layer = _Layer(B, H, D, dtype, cap)
    side = QuestBounds(P)
    side.allocate(layer, cap)
    layer.capacity = cap
    lens = torch.zeros(B, dtype=torch.int32)

    def commit(counts, L):
        nonlocal lens
        counts = torch.tensor(counts, dtype=torch.int32)
        k = torch.stack([torch.cat([keys[b, :, lens[b]:lens[b] + counts[b]],
                                    _randn((H, L - int(counts[b]), D), g, dtype, "cpu")], dim=1)
                         for b in range(B)])  # the valid tokens first, then padding
        new = lens + counts
        side.commit(layer, lens.clone(), new, k, k, counts, int(lens.max()))
        lens = new

    commit([20, 7, 0], 20)
    commit([11, 3, 9], 11)  # continues mid-page
    for _ in range(6):  # decode tokens
        pos = lens.to(torch.int64)
        side.append_one(layer, keys[torch.arange(B), :, pos].unsqueeze(2), None, pos, lens + 1)
        lens = lens + 1
    kmin, kmax = ref.quest_page_metadata_ref(keys, lens, P)
    pages = -(-lens.long() // P)
    for b in range(B):
        n = int(pages[b])
        torch.testing.assert_close(side.kmin[b, :, :n].double(), kmin[b, :, :n], atol=0, rtol=0)
        torch.testing.assert_close(side.kmax[b, :, :n].double(), kmax[b, :, :n], atol=0, rtol=0)


def test_config_checks_both_methods_fields():
    import kvsparse

    cfg = kvsparse.make_config("quest_qaq", token_budget=512, uniform_bits=4)
    assert cfg.method == "quest_qaq" and cfg.page_size == 16 and cfg.max_width == 4 and cfg.dense_layers == 2
    with pytest.raises(ValueError, match="mode"):
        kvsparse.make_config("quest_qaq", mode="head")
    with pytest.raises(ValueError, match="token_budget"):
        kvsparse.make_config("quest_qaq", token_budget=8, page_size=16)
    with pytest.raises(ValueError, match="alpha"):
        kvsparse.make_config("quest_qaq", alpha=0.7)
    with pytest.raises(ValueError, match="chunk_size"):
        kvsparse.make_config("quest_qaq", chunk_size=20, page_size=16)
    with pytest.raises(ValueError, match="unknown option"):
        kvsparse.make_config("quest_qaq", compression=0.5)
