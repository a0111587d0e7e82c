"""Re-quantization and compaction of width-binned QAQ pages (kvsparse.qaqp.requantize /
compact, csrc/kernels/qaqp.h sections 4 and 5) against references.

Semantics checked: a token that moves is its dequantized row (rounded to the
cache dtype) quantized again at its new widths, with its position; a token that
does not move keeps its bytes; a compaction keeps every token bit for bit, packs
each class into ceil(live / 64) pages at consecutive addresses from 0, and
recomputes the Quest bounds over the tokens left.
"""
import pytest
import torch

from kvsparse import qaqp
from kvs_testing import DEVICES, DTYPES, DT_IDS, HAS_GPU, seed
from test_qaqp import _deq_ref, _fill

CASES = [pytest.param(dt, D, id=f"{i}-D{D}") for dt, i in zip(DTYPES, DT_IDS) for D in (64, 128)]


def _headers(st):
    """(wk, wv, mask, n_used) of every listed page, per (b, hk): {address: tuple}."""
    ar = st.arena.cpu()
    out = {}
    for a in st.pages.cpu().flatten().tolist():
        if a >= 0:
            h = ar[16 * a: 16 * a + 16].tolist()
            out[a] = (h[8], h[9], int.from_bytes(bytes(h[:8]), "little"), h[10])
    return out


def _by_pos(st):
    """{(b, hk, position): (keys, values, (wk, wv))} of every live token."""
    k, v, pos = qaqp.dequantize(st)
    k, v, pos = k.cpu(), v.cpu(), pos.cpu()
    hdr = _headers(st)
    pages = st.pages.cpu()
    out = {}
    B, Hkv, R = pos.shape
    for b in range(B):
        for h in range(Hkv):
            for r in range(R):
                p = int(pos[b, h, r])
                if p < 0:
                    continue
                a = int(pages[b, h, r // 64])
                key = (b, h, p)
                assert key not in out, f"position {p} of (b={b}, hk={h}) held twice"
                out[key] = (k[b, h, r], v[b, h, r], hdr[a][:2])
    return out


def _targets(st, g, kinds=(255, "lower", "same", "higher", "bad")):
    """Random target widths [B, Hkv, L, 64] for the listed pages (L = maxp):
    a mix of no-change (255), lower widths, the same class, wider ones and
    invalid ones."""
    B, Hkv, L = st.pages.shape
    hdr = _headers(st)
    pages = st.pages.cpu()
    nk = torch.full((B, Hkv, L, 64), 255, dtype=torch.uint8)
    nv = nk.clone()
    lower = {8: (4, 2), 4: (2, 1), 2: (1, 0), 1: (0,), 0: (0,)}
    for b in range(B):
        for h in range(Hkv):
            for j in range(L):
                a = int(pages[b, h, j])
                if a < 0:
                    continue
                wk, wv = hdr[a][:2]
                for i in range(64):
                    kind = kinds[int(torch.randint(len(kinds), (1,), generator=g))]
                    if kind == "lower":
                        lk, lv = lower[wk], lower[wv]
                        nk[b, h, j, i] = lk[int(torch.randint(len(lk), (1,), generator=g))]
                        nv[b, h, j, i] = lv[int(torch.randint(len(lv), (1,), generator=g))]
                    elif kind == "same":
                        nk[b, h, j, i], nv[b, h, j, i] = wk, wv
                    elif kind == "higher":
                        nk[b, h, j, i], nv[b, h, j, i] = min(8, 2 * wk + 1 if wk < 8 else 8), 8
                    elif kind == "bad":
                        nk[b, h, j, i], nv[b, h, j, i] = 3, wv
    return nk, nv


def _moves(nk, nv, old):
    """Whether a slot with widths ``old`` and targets (nk, nv) moves (qaqp.h section 4)."""
    k, v = int(nk), int(nv)
    return k in qaqp.WIDTHS and v in qaqp.WIDTHS and (k, v) != tuple(old) and k <= old[0] and v <= old[1]


def _expected(st, nk, nv, ref, dtype, max_moves=None):
    """What each live token must hold after requantize(st, nk, nv): {(b, hk, pos): (k, v, widths)}."""
    before = _by_pos(st)
    k, v, pos = qaqp.dequantize(st)
    pos = pos.cpu()
    B, Hkv, R = pos.shape
    want, n_moved = {}, torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for r in range(R):
                p = int(pos[b, h, r])
                if p < 0:
                    continue
                kk, vv, old = before[(b, h, p)]
                j, i = divmod(r, 64)
                t = (int(nk[b, h, j, i]), int(nv[b, h, j, i]))
                if _moves(*t, old) and (max_moves is None or n_moved[b, h] < max_moves):
                    n_moved[b, h] += 1
                    kq = _deq_ref(kk.float(), torch.tensor(t[0], dtype=torch.uint8), ref["n_out_k"]).to(dtype)
                    vq = _deq_ref(vv.float(), torch.tensor(t[1], dtype=torch.uint8), ref["n_out_v"]).to(dtype)
                    want[(b, h, p)] = (kq, vq, t)
                else:
                    want[(b, h, p)] = (kk, vv, old)
    return want, n_moved


def _assert_same(got, want):
    assert set(got) == set(want)
    for key, (k, v, w) in want.items():
        gk, gv, gw = got[key]
        assert tuple(gw) == tuple(w), key
        torch.testing.assert_close(gk, k, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"keys of {key}: {m}")
        torch.testing.assert_close(gv, v, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"values of {key}: {m}")


def _bounds_ok(st, dtype, exact):
    """Every page's bounds contain (exact: equal) the min / max of its live tokens' dequantized keys."""
    lay = {}
    ar = st.arena.cpu()
    k, _, pos = qaqp.dequantize(st)
    k, pos = k.cpu(), pos.cpu()
    B, Hkv, maxp = st.pages.shape
    D, ds = st.head_dim, torch.empty((), dtype=dtype).element_size()
    for b in range(B):
        for h in range(Hkv):
            for j in range(int(st.n_pages[b, h])):
                a = int(st.pages[b, h, j])
                wk, wv = int(ar[16 * a + 8]), int(ar[16 * a + 9])
                L = lay.setdefault((wk, wv), qaqp.layout(D, wk, wv, st.n_out_k, st.n_out_v, dtype, True))
                mn = ar[16 * a + L["kmin"]: 16 * a + L["kmin"] + D * ds].view(dtype).float()
                mx = ar[16 * a + L["kmax"]: 16 * a + L["kmax"] + D * ds].view(dtype).float()
                rows = k[b, h, j * 64:(j + 1) * 64][pos[b, h, j * 64:(j + 1) * 64] >= 0].float()
                if rows.shape[0] == 0:
                    continue
                if exact:
                    torch.testing.assert_close(mn, rows.amin(0), rtol=0, atol=0)
                    torch.testing.assert_close(mx, rows.amax(0), rtol=0, atol=0)
                else:
                    assert (mn <= rows.amin(0)).all() and (mx >= rows.amax(0)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,D", CASES)
def test_requantize_matches_reference(device, dtype, D):
    s = seed("rq", dtype, D)
    st, ref = _fill(device, dtype, 2, 2, 150, D, counts=[150, 97], s=s, bounds=True, widths=(1, 2, 4, 8))
    nk, nv = _targets(st, torch.Generator().manual_seed(s))
    want, n_moved = _expected(st, nk, nv, ref, dtype)
    assert int(n_moved.sum()) > 20
    moved = qaqp.requantize(st, nk.to(device), nv.to(device))
    qaqp.check(st)
    assert torch.equal(moved.cpu(), n_moved)
    _assert_same(_by_pos(st), want)
    _bounds_ok(st, dtype, exact=False)  # the old pages keep a superset


@pytest.mark.parametrize("device", DEVICES)
def test_requantize_takes_at_most_max_moves_in_list_order(device):
    dtype, D = torch.float32, 64
    st, ref = _fill(device, dtype, 1, 3, 200, D, s=5, widths=(4, 8))
    nk, nv = _targets(st, torch.Generator().manual_seed(5), kinds=("lower",))
    want, n_moved = _expected(st, nk, nv, ref, dtype, max_moves=7)
    moved = qaqp.requantize(st, nk.to(device), nv.to(device), max_moves=7)
    assert moved.cpu().tolist() == [[7, 7, 7]] == n_moved.tolist()
    _assert_same(_by_pos(st), want)


@pytest.mark.parametrize("device", DEVICES)
def test_append_with_positions(device):
    dtype, D = torch.float16, 64
    st = qaqp.alloc(1, 2, D, 10, dtype=dtype, device=device)
    k = torch.randn(1, 2, 5, D, dtype=dtype, device=device)
    pos = torch.tensor([[[9, 3, 400, 0, 7], [1, 2, 3, 4, 5]]], dtype=torch.int32, device=device)
    wk = torch.tensor([[[4, 4, 255, 4, 4], [4, 4, 4, 4, 4]]], dtype=torch.uint8, device=device)
    qaqp.append(st, k, k, wk, wk, torch.zeros(1, dtype=torch.int32, device=device), pos=pos)
    got = sorted(p for (_, h, p) in _by_pos(st) if h == 0)
    assert got == [0, 3, 7, 9]  # the token of widths 255 is skipped
    assert sorted(p for (_, h, p) in _by_pos(st) if h == 1) == [1, 2, 3, 4, 5]


def _check_compacted(st, dtype):
    """Consecutive pages from address 0, one class per page, ceil(live / 64)
    pages per class with all but the last full, masks packed from slot 0,
    open = the last page of each class."""
    hdr = _headers(st)
    B, Hkv, maxp = st.pages.shape
    pages, n_pages, opn = st.pages.cpu(), st.n_pages.cpu(), st.open.cpu()
    addr = 0
    for b in range(B):
        for h in range(Hkv):
            seen = []
            for j in range(int(n_pages[b, h])):
                a = int(pages[b, h, j])
                assert a == addr, "pages are consecutive from 0 in (b, hk, class) order"
                wk, wv, mask, used = hdr[a]
                assert mask == (1 << used) - 1 and used >= 1
                c = qaqp.WIDTHS.index(wk) * 5 + qaqp.WIDTHS.index(wv)
                assert not seen or seen[-1][0] <= c
                seen.append((c, used, a))
                addr += qaqp.page_bytes(st.head_dim, wk, wv, st.n_out_k, st.n_out_v, dtype, st.bounds) // 16
            assert (pages[b, h, int(n_pages[b, h]):] == -1).all()
            for c in range(qaqp.NCLASS):
                mine = [x for x in seen if x[0] == c]
                assert all(u == 64 for _, u, _ in mine[:-1])
                assert int(opn[b, h, c]) == (mine[-1][2] if mine else -1)
    assert int(st.top.cpu()) == addr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,D", CASES)
def test_compact_keeps_tokens_and_tightens_bounds(device, dtype, D):
    s = seed("cp", dtype, D)
    st, ref = _fill(device, dtype, 2, 2, 260, D, counts=[260, 131], s=s, bounds=True, widths=(2, 4, 8))
    nk, nv = _targets(st, torch.Generator().manual_seed(s), kinds=(255, "lower", "lower"))
    qaqp.requantize(st, nk.to(device), nv.to(device))
    before = _by_pos(st)
    top0 = int(st.top.cpu())
    q = torch.randn(2, 8, D).to(dtype).to(device)
    out0 = qaqp.attention(q, st)
    new = qaqp.compact(st)
    qaqp.check(new)
    _assert_same(_by_pos(new), before)
    _check_compacted(new, dtype)
    _bounds_ok(new, dtype, exact=True)
    assert int(new.top.cpu()) <= top0 and new.arena.numel() <= 16 * top0
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=4e-3, rtol=1.6e-2)
    torch.testing.assert_close(qaqp.attention(q, new).float(), out0.float(), **tol)
    # in place: the same result in the store's own buffers; appending afterwards works
    arena = st.arena
    qaqp.compact(st, in_place=True)
    assert st.arena is arena and int(st.top.cpu()) == int(new.top.cpu())
    _assert_same(_by_pos(st), before)
    kx = torch.randn(2, 2, 70, D).to(dtype).to(device)
    qaqp.append(st, kx, kx, 4, 4, torch.tensor([5000, 5000], dtype=torch.int32, device=device))
    qaqp.check(st)
    assert len(_by_pos(st)) == len(before) + 2 * 2 * 70


@pytest.mark.parametrize("device", DEVICES)
def test_compact_reclaims_emptied_pages(device):
    """Every 8-bit token lowered to 4 bits: the 8-bit pages empty, and after a
    compaction the store is exactly what appending at 4 bits would have used."""
    dtype, D = torch.bfloat16, 128
    st, ref = _fill(device, dtype, 1, 2, 200, D, s=9, widths=(8,), bounds=True)
    L = st.pages.shape[2]
    four = torch.full((1, 2, L, 64), 4, dtype=torch.uint8, device=device)
    qaqp.requantize(st, four, four)
    top_holes = int(st.top.cpu())
    new = qaqp.compact(st)
    per = qaqp.page_bytes(D, 4, 4, 2, 2, dtype, True) // 16
    assert int(new.top.cpu()) == 2 * 4 * per < top_holes  # 200 tokens: 4 pages per KV head
    assert new.n_pages.cpu().tolist() == [[4, 4]]
    _check_compacted(new, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_compact_overflow_sets_flags(device):
    st, _ = _fill(device, torch.float32, 1, 2, 300, 64, s=3, widths=(4,), poison=False)
    small = qaqp.compact(st, arena_bytes=16 * (int(st.top.cpu()) // 3))
    assert int(small.flags.cpu()) & qaqp.FLAG_ARENA
    with pytest.raises(RuntimeError, match="arena"):
        qaqp.check(small)
    assert int(small.top.cpu()) * 16 <= small.arena.numel()


def _opcheck_args(device):
    st, ref = _fill(device, torch.float32, 2, 2, 70, 64, counts=[70, 33], s=11, bounds=True, poison=False)
    nk = torch.full((2, 2, st.pages.shape[2], 64), 2, dtype=torch.uint8, device=device)
    out = qaqp.alloc(2, 2, 64, 70, dtype=torch.float32, device=device, bounds=True)
    k = ref["k"][:, :, :3].contiguous().to(device)
    w = ref["wk"][:, :, :3].contiguous().to(device)
    pos = torch.arange(12, dtype=torch.int32, device=device).view(2, 2, 3)
    cnt = torch.tensor([3, 1], dtype=torch.int32, device=device)
    return {
        "qaqp_requant_take": (st.arena.clone(), st.pages, nk, nk.clone(), 40, 64, torch.float32, 2, 2, True),
        "qaqp_compact": (st.arena, st.pages, st.n_pages, *[t.clone() for t in out.state()], 64, torch.float32, 2, 2,
                         True),
        "qaqp_append": (k, k.clone(), w, w.clone(), cnt, cnt, *[t.clone() for t in st.state()], 2, 2, True, pos),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["qaqp_requant_take", "qaqp_compact", "qaqp_append"])
def test_opcheck(device, op_name):
    torch.library.opcheck(getattr(torch.ops.kvsparse, op_name).default, _opcheck_args(device)[op_name])


def _bad(device):
    st, _ = _fill(device, torch.float32, 2, 2, 70, 64, s=2, poison=False)
    L = st.pages.shape[2]
    nk = torch.full((2, 2, L, 64), 2, dtype=torch.uint8, device=device)
    out = qaqp.alloc(2, 2, 64, 70, dtype=torch.float32, device=device)
    T = torch.ops.kvsparse.qaqp_requant_take
    C = torch.ops.kvsparse.qaqp_compact
    g = (64, torch.float32, 2, 2, False)
    return {
        "new_wk_dtype": (lambda: T(st.arena, st.pages, nk.int(), nk, 4, *g), TypeError, "new_wk"),
        "new_wv_shape": (lambda: T(st.arena, st.pages, nk, nk[:, :, :1].contiguous(), 4, *g), ValueError, "new_wv"),
        "n_range": (lambda: T(st.arena, st.pages, nk, nk, 64 * L + 1, *g), ValueError, r"\bn\b"),
        "take_dtype": (lambda: T(st.arena, st.pages, nk, nk, 4, 64, torch.int32, 2, 2, False), TypeError, "dtype"),
        "take_alias": (lambda: T(st.arena, st.arena[:16].view(torch.int32).view(1, 1, 4), nk[:1, :1, :4].contiguous(),
                                 nk[:1, :1, :4].contiguous(), 4, *g), ValueError, "share"),
        "compact_alias": (lambda: C(st.arena, st.pages, st.n_pages, st.arena, *out.state()[1:], *g), ValueError,
                          "share"),
        "compact_pages": (lambda: C(st.arena, st.pages.long(), st.n_pages, *out.state(), *g), TypeError, "pages_src"),
        "compact_npages": (lambda: C(st.arena, st.pages, st.n_pages[:1].contiguous(), *out.state(), *g), ValueError,
                           "n_pages_src"),
        "compact_open": (lambda: C(st.arena, st.pages, st.n_pages, out.arena, out.top, out.open[:, :, :3].contiguous(),
                                   *out.state()[3:], *g), ValueError, "open"),
        "append_pos": (lambda: qaqp.append(st, torch.zeros(2, 2, 1, 64), torch.zeros(2, 2, 1, 64), 4, 4,
                                           torch.zeros(2, dtype=torch.int32, device=device),
                                           pos=torch.zeros(2, 2, 3, dtype=torch.int32, device=device)), ValueError,
                       "pos"),
    }


BAD = ["new_wk_dtype", "new_wv_shape", "n_range", "take_dtype", "take_alias", "compact_alias", "compact_pages",
       "compact_npages", "compact_open", "append_pos"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BAD)
def test_bad_inputs(device, name):
    fn, exc, match = _bad(device)[name]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_cuda_matches_cpu(dtype, D):
    """The same re-quantization and compaction on both devices: the same tokens
    bit for bit, the same moved counts, and a compacted store identical byte
    for byte (its addresses do not depend on the device)."""
    s = seed("rqc", dtype, D)
    a, _ = _fill("cpu", dtype, 2, 4, 333, D, counts=[333, 200], s=s, bounds=True, widths=(2, 4, 8))
    b, _ = _fill("cuda", dtype, 2, 4, 333, D, counts=[333, 200], s=s, bounds=True, widths=(2, 4, 8))
    nk, nv = _targets(a, torch.Generator().manual_seed(s), kinds=(255, "lower", "same", "bad"))
    # targets follow the page order, which is the same on both devices
    ma = qaqp.requantize(a, nk, nv)
    mb = qaqp.requantize(b, nk.cuda(), nv.cuda())
    assert torch.equal(ma, mb.cpu())
    _assert_same(_by_pos(b), _by_pos(a))
    ca, cb = qaqp.compact(a), qaqp.compact(b)
    for x, y in zip(ca.state()[1:], cb.state()[1:]):
        assert torch.equal(x, y.cpu())
    top = int(ca.top) * 16
    assert torch.equal(ca.arena[:top], cb.arena[:top].cpu())
