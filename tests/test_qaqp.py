"""QAQ over width-binned pages (kvsparse.qaqp, csrc/kernels/qaqp.h) against references.

The quantization of one token is qaq.h's (reference: kvsparse.reference's
qaq_quantize_group_ref); these tests check where the bytes go (one class per
page, page lists, slots, bounds), the dequantized content, and the attention
against a float64 reference over the dequantized tokens.
"""
import math

import pytest
import torch

from kvsparse import qaqp
from kvsparse.reference import qaq_quantize_group_ref
from kvs_testing import DEVICES, DTYPES, DT_IDS, HAS_GPU, assert_close, dirty, seed

WSET = (0, 1, 2, 4, 8)


def _deq_ref(x, w, n_out):
    """Dequantized groups x [..., D] at widths w [...] (float32, qaq.h's rule)."""
    codes, sz, oidx, oval = qaq_quantize_group_ref(x, w, n_out)
    s, z = sz[..., 0].float(), sz[..., 1].float()
    wl = w.long()
    d = torch.where(wl[..., None] > 0, z[..., None] + s[..., None] * codes.float(), (z + s * 0.5)[..., None].expand(codes.shape))
    if n_out:
        d = d.scatter(-1, oidx.long(), oval.float())
    return d


def _fill(device, dtype, B, Hkv, n, D, n_out_k=2, n_out_v=2, bounds=False, widths=WSET, counts=None, s=0,
          chunk=None, poison=True):
    g = torch.Generator().manual_seed(s)
    k = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    wl = torch.tensor(widths, dtype=torch.uint8)
    wk = wl[torch.randint(len(widths), (B, Hkv, n), generator=g)]
    wv = wl[torch.randint(len(widths), (B, Hkv, n), generator=g)]
    counts = [n] * B if counts is None else counts
    pos0 = torch.randint(0, 1000, (B,), generator=g, dtype=torch.int32)
    st = qaqp.alloc(B, Hkv, D, n, dtype=dtype, device=device, n_out_k=n_out_k, n_out_v=n_out_v, bounds=bounds)
    if poison:  # the kernels must not rely on a zeroed arena
        st.arena.copy_(torch.randint(0, 256, st.arena.shape, generator=g, dtype=torch.uint8))
    cnt = torch.tensor(counts, dtype=torch.int32)
    dev = lambda t: t.to(device)  # noqa: E731
    if chunk is None:
        qaqp.append(st, dev(k), dev(v), dev(wk), dev(wv), dev(pos0), dev(cnt))
    else:  # in chunks of `chunk` tokens, as decode / chunked prefill append
        for i0 in range(0, n, chunk):
            i1 = min(n, i0 + chunk)
            c = (cnt - i0).clamp(0, i1 - i0).to(torch.int32)
            qaqp.append(st, dev(k[:, :, i0:i1]), dev(v[:, :, i0:i1]), dev(wk[:, :, i0:i1]), dev(wv[:, :, i0:i1]),
                        dev(pos0 + i0), dev(c))
    return st, dict(k=k, v=v, wk=wk, wv=wv, pos0=pos0, counts=counts, n_out_k=n_out_k, n_out_v=n_out_v)


def _by_position(st, plist=None):
    """Dequantized (k, v) of each (b, hk) keyed by position, and the raw (k, v, pos)."""
    k, v, pos = qaqp.dequantize(st, plist)
    return k.cpu(), v.cpu(), pos.cpu()


def _check_content(st, ref, dtype):
    k, v, pos = _by_position(st)
    B, Hkv, n, D = ref["k"].shape
    kref = _deq_ref(ref["k"], ref["wk"], ref["n_out_k"]).to(dtype)
    vref = _deq_ref(ref["v"], ref["wv"], ref["n_out_v"]).to(dtype)
    for b in range(B):
        c = ref["counts"][b]
        for h in range(Hkv):
            live = pos[b, h] >= 0
            p = pos[b, h][live].long() - int(ref["pos0"][b])
            assert sorted(p.tolist()) == list(range(c)), f"positions of (b={b}, hk={h})"
            order = torch.argsort(p)
            torch.testing.assert_close(k[b, h][live][order], kref[b, h, :c], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(v[b, h][live][order], vref[b, h, :c], rtol=0, atol=0, equal_nan=True)
            assert (k[b, h][~live] == 0).all() and (v[b, h][~live] == 0).all()


def _check_pages(st, ref, dtype):
    """One class per page, ceil(tokens of the class / 64) pages per class, and
    the arena's use is the sum of the page sizes."""
    B, Hkv, n, D = ref["k"].shape
    ar = st.arena.cpu()
    pages, n_pages = st.pages.cpu(), st.n_pages.cpu()
    used = 0
    for b in range(B):
        c = ref["counts"][b]
        for h in range(Hkv):
            want = {}
            for i in range(c):
                key = (int(ref["wk"][b, h, i]), int(ref["wv"][b, h, i]))
                want[key] = want.get(key, 0) + 1
            got = {}
            for j in range(int(n_pages[b, h])):
                a = int(pages[b, h, j])
                hdr = ar[16 * a: 16 * a + 16]
                key = (int(hdr[8]), int(hdr[9]))
                mask = int.from_bytes(bytes(hdr[:8].tolist()), "little")
                assert int(hdr[10]) == bin(mask).count("1")
                got[key] = got.get(key, []) + [int(hdr[10])]
                used += qaqp.page_bytes(D, *key, ref["n_out_k"], ref["n_out_v"], dtype, st.bounds)
            assert set(got) == set(want)
            for key, fills in got.items():
                assert sum(fills) == want[key] and len(fills) == -(-want[key] // 64), (key, fills)
    assert int(st.top.cpu()) * 16 == used
    assert int(st.flags.cpu()) == 0


CASES = [pytest.param(dt, D, id=f"{i}-D{D}") for dt, i in zip(DTYPES, DT_IDS) for D in (64, 128)]
CASES += [pytest.param(dt, D, id=f"{i}-D{D}") for dt, i in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))
          for D in (80, 96, 256)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,D", CASES)
@pytest.mark.parametrize("n_out", [(2, 2), (0, 4)], ids=["o2-2", "o0-4"])
def test_append_dequantize_matches_reference(device, dtype, D, n_out):
    dirty(device)
    st, ref = _fill(device, dtype, 2, 3, 150, D, *n_out, counts=[150, 77], s=seed("app", dtype, D, n_out))
    _check_content(st, ref, dtype)
    _check_pages(st, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_append_in_chunks_equals_one_call(device, chunk):
    """Decode-sized and chunked appends give the same page lists and slots as
    one call (the order of qaqp.h): the dequantized pages agree row for row."""
    one, _ = _fill(device, torch.float16, 2, 2, 140, 64, counts=[140, 90], s=5, widths=(2, 4, 8))
    many, _ = _fill(device, torch.float16, 2, 2, 140, 64, counts=[140, 90], s=5, widths=(2, 4, 8), chunk=chunk)
    assert torch.equal(one.n_pages.cpu(), many.n_pages.cpu())
    for x, y in zip(_by_position(one), _by_position(many)):
        assert torch.equal(x, y)
    assert int(one.top.cpu()) == int(many.top.cpu())  # the same pages, at other addresses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_bounds_are_min_max_of_dequantized_keys(device, dtype):
    D = 64
    st, ref = _fill(device, dtype, 2, 2, 130, D, bounds=True, counts=[130, 64], s=seed("bounds", dtype), widths=(1, 4, 8))
    k, _, pos = _by_position(st)
    ar = st.arena.cpu()
    for b in range(2):
        for h in range(2):
            for j in range(int(st.n_pages[b, h])):
                a = int(st.pages[b, h, j])
                hdr = ar[16 * a: 16 * a + 16]
                lay = qaqp.layout(D, int(hdr[8]), int(hdr[9]), 2, 2, dtype, True)
                base = 16 * a
                kmin = ar[base + lay["kmin"]: base + lay["kmin"] + D * k.element_size()].view(dtype)
                kmax = ar[base + lay["kmax"]: base + lay["kmax"] + D * k.element_size()].view(dtype)
                rows = k[b, h, j * 64:(j + 1) * 64][pos[b, h, j * 64:(j + 1) * 64] >= 0]
                assert rows.shape[0] > 0
                torch.testing.assert_close(kmin, rows.amin(0), rtol=0, atol=0)
                torch.testing.assert_close(kmax, rows.amax(0), rtol=0, atol=0)


def _rows(x, pos, pos0):
    """x [B, Hkv, n, D] gathered at the token of every slot (pos - pos0; zeros where pos < 0)."""
    B, Hkv, N = pos.shape
    i = (pos.long() - pos0.long()[:, None, None]).clamp_min(0)
    out = x.gather(2, i[..., None].expand(B, Hkv, N, x.shape[-1]))
    return torch.where(pos[..., None] >= 0, out, torch.zeros_like(out))


def _attn_ref(q, k, v, pos, scale):
    """float64 attention of q [B, H, D] over the live rows (pos >= 0) of k, v [B, Hkv, N, D]."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = torch.zeros(B, H, D, dtype=torch.float64)
    pmax = torch.zeros(B, Hkv, k.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            live = pos[b, h] >= 0
            if not live.any():
                continue
            kk, vv = k[b, h][live].double(), v[b, h][live].double()
            s = (q[b, h * G:(h + 1) * G].double() * scale) @ kk.T
            p = torch.softmax(s, -1)
            out[b, h * G:(h + 1) * G] = p @ vv
            pmax[b, h][live] = p.amax(0)
    return out, pmax


ATT_CASES = [pytest.param(dt, D, G, id=f"{i}-D{D}-G{G}") for dt, i in zip(DTYPES, DT_IDS) for D in (64, 128)
             for G in (1, 4)]
ATT_CASES += [pytest.param(dt, D, G, id=f"{i}-D{D}-G{G}") for dt, i in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))
              for D in (80, 96, 256) for G in (3, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,D,G", ATT_CASES)
@pytest.mark.parametrize("listed", ["all", "some"])
def test_attention_matches_reference(device, dtype, D, G, listed):
    B, Hkv = 2, 2
    s = seed("attn", dtype, D, G, listed)
    st, ref = _fill(device, dtype, B, Hkv, 300, D, counts=[300, 129], s=s, widths=(1, 2, 4, 8))
    g = torch.Generator().manual_seed(s + 1)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    plist = st.pages.clone()
    if listed == "some":  # every other page, the rest -1 (Quest's padded selection)
        plist[:, :, 1::2] = -1
        plist = plist.contiguous()
    _, _, pos = _by_position(st, plist)
    # the kernels attend to the float32 dequantized values (not rounded to the dtype)
    k, v = (_rows(_deq_ref(ref[x], ref["w" + x], ref["n_out_" + x]), pos, ref["pos0"]) for x in ("k", "v"))
    scale = 1.0 / math.sqrt(D)
    dirty(device)
    out, pm = qaqp.attention(q.to(device), st, plist, return_p_max=True)
    want, pmax = _attn_ref(q, k, v, pos, scale)
    assert_close(out, want, dtype, "qaqp attention")
    torch.testing.assert_close(pm.cpu().reshape(B, Hkv, -1).double(), pmax, atol=1e-5, rtol=1e-4)
    out2 = qaqp.attention(q.to(device), st, plist)
    assert torch.equal(out2.cpu(), out.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_attention_empty_nan_and_bad_addresses(device):
    st, ref = _fill(device, torch.float32, 2, 2, 70, 64, counts=[70, 0], s=3)
    q = torch.randn(2, 4, 64, device=device)
    out = qaqp.attention(q, st)
    assert (out[1] == 0).all() and torch.isfinite(out[0]).all()
    # addresses that name no page read as empty: out of the arena, negative, mid-page
    bad = st.pages.clone()
    bad[0, 0, 0] = 1 << 30
    bad[0, 0, 1] = -7
    bad[0, 1, :] = -1
    out_bad = qaqp.attention(q, st, bad.contiguous())
    assert (out_bad[0, 2:] == 0).all()
    # NaN in a live token's keys: NaN rows for that KV head only
    k = ref["k"].clone()
    k[0, 1, 5, 3] = float("nan")
    st2 = qaqp.alloc(2, 2, 64, 70, dtype=torch.float32, device=device, n_out_k=0)
    qaqp.append(st2, k.to(device), ref["v"].to(device), ref["wk"].to(device), ref["wv"].to(device),
                ref["pos0"].to(device), torch.tensor([70, 0], dtype=torch.int32, device=device))
    o = qaqp.attention(q, st2)
    assert o[0, 2:].isnan().all() and torch.isfinite(o[0, :2]).all() and (o[1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_full_arena_and_page_list_set_flags(device):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 200, 64, generator=g).to(device)
    st = qaqp.alloc(1, 2, 64, 200, device=device, dtype=torch.float32, widths=(8, 8),
                    arena_bytes=3 * qaqp.page_bytes(64, 8, 8, dtype=torch.float32))
    qaqp.append(st, k, k, 8, 8, torch.zeros(1, dtype=torch.int32, device=device))
    assert int(st.flags) & qaqp.FLAG_ARENA
    with pytest.raises(RuntimeError, match="arena"):
        qaqp.check(st)
    assert int((st.n_pages).sum()) == 3  # what fitted stays readable
    st = qaqp.alloc(1, 2, 64, 200, device=device, dtype=torch.float32, max_pages=2)
    qaqp.append(st, k, k, 8, 8, torch.zeros(1, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="page list"):
        qaqp.check(st)
    assert qaqp.live_tokens(st).tolist() == [[128, 128]]


def test_page_bytes_and_token_cost():
    # D = 128, 4-bit K and V, 2 outliers each, bf16: about 156 B a token (qaqp.h)
    tb = qaqp.token_bytes(128, 4, 4, 2, 2, torch.bfloat16)
    assert 150 <= tb <= 160
    assert qaqp.token_bytes(128, 4, 4, 2, 2, torch.bfloat16, bounds=True) == tb + 8
    with pytest.raises(ValueError, match="wk"):
        qaqp.page_bytes(128, 3, 4)


def _small(device):
    st, ref = _fill(device, torch.float32, 2, 2, 70, 64, counts=[70, 33], s=11, bounds=True, poison=False)
    return st, ref


def _opcheck_cases():
    def app(st, ref, dev):
        k = ref["k"][:, :, :3].contiguous().to(dev)
        return (k, k.clone(), ref["wk"][:, :, :3].contiguous().to(dev), ref["wv"][:, :, :3].contiguous().to(dev),
                torch.tensor([70, 33], dtype=torch.int32, device=dev), torch.tensor([3, 1], dtype=torch.int32, device=dev),
                *[t.clone() for t in st.state()], 2, 2, True)
    return {
        "qaqp_append": app,
        "qaqp_dequantize": lambda st, ref, dev: (st.arena, st.pages, 64, torch.float32, 2, 2, True),
        "qaqp_attention": lambda st, ref, dev: (torch.randn(2, 4, 64, device=dev), st.arena, st.pages, 2, 2, 2, True,
                                                0.125, True),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["qaqp_append", "qaqp_dequantize", "qaqp_attention"])
def test_opcheck(device, op_name):
    st, ref = _small(device)
    args = _opcheck_cases()[op_name](st, ref, device)
    torch.library.opcheck(getattr(torch.ops.kvsparse, op_name).default, args)


def _bad(device):
    st, ref = _small(device)
    dev = device
    k1 = ref["k"][:, :, :1].contiguous().to(dev)
    w1 = torch.full((2, 2, 1), 4, dtype=torch.uint8, device=dev)
    p0 = torch.zeros(2, dtype=torch.int32, device=dev)
    q = torch.randn(2, 4, 64, device=dev)
    A = torch.ops.kvsparse.qaqp_append
    cases = {
        "k_dtype": (lambda: qaqp.append(st, k1.half(), k1.half(), 4, 4, p0), TypeError, r"\bk\b", False),
        "k_rank": (lambda: A(k1[0], k1[0], w1, w1, p0, p0, *st.state(), 2, 2, True), ValueError, r"\bk\b", False),
        "v_shape": (lambda: A(k1, k1[:, :1].contiguous(), w1, w1, p0, p0, *st.state(), 2, 2, True), ValueError, r"\bv\b", False),
        "wk_dtype": (lambda: A(k1, k1, w1.int(), w1, p0, p0, *st.state(), 2, 2, True), TypeError, "wk", False),
        "wv_shape": (lambda: A(k1, k1, w1, w1[:1].contiguous(), p0, p0, *st.state(), 2, 2, True), ValueError, "wv", False),
        "pos0_dtype": (lambda: A(k1, k1, w1, w1, p0.long(), p0, *st.state(), 2, 2, True), TypeError, "pos0", False),
        "n_out_odd": (lambda: A(k1, k1, w1, w1, p0, p0, *st.state(), 3, 2, True), ValueError, "n_out_k", False),
        "n_out_big": (lambda: qaqp.attention(q, st._replace(n_out_v=40)), ValueError, "n_out_v", False),
        "arena_16": (lambda: qaqp.attention(q, st._replace(arena=st.arena[:-8])), ValueError, "arena", False),
        "arena_dtype": (lambda: qaqp.attention(q, st._replace(arena=st.arena.char())), TypeError, "arena", False),
        "plist_dtype": (lambda: qaqp.attention(q, st, st.pages.long()), TypeError, "plist", False),
        "plist_shape": (lambda: qaqp.attention(q, st, st.pages[:1].contiguous()), ValueError, "plist", False),
        "q_dtype": (lambda: qaqp.attention(q.double(), st._replace(dtype=torch.float64)), TypeError, r"\bq\b", False),
        "q_store_dtype": (lambda: qaqp.attention(q.half(), st), TypeError, r"\bq\b", False),
        "H_not_multiple": (lambda: torch.ops.kvsparse.qaqp_attention(q[:, :3].contiguous(), st.arena, st.pages, 2, 2, 2, True, 0.1, False), ValueError, "num_kv_heads", False),
        "head_dim": (lambda: qaqp.dequantize(st._replace(head_dim=36)), ValueError, "head_dim", False),
        "alias": (lambda: A(k1, k1, w1, w1, p0, p0, st.arena, st.top, st.open, st.pages, st.pages[:, :, :1], st.flags, 2, 2, True), ValueError, "share|n_pages", False),
        "width_value": (lambda: qaqp.append(st, k1, k1, 3, 4, p0), ValueError, "wk", True),
        "count_value": (lambda: qaqp.append(st, k1, k1, 4, 4, p0, p0 + 2), ValueError, "count", True),
        "range_fp16": (lambda: qaqp.append(st, k1 * 1e5, k1, 4, 4, p0), ValueError, "fp16", True),
    }
    return cases


BAD = ["k_dtype", "k_rank", "v_shape", "wk_dtype", "wv_shape", "pos0_dtype", "n_out_odd", "n_out_big", "arena_16",
       "arena_dtype", "plist_dtype", "plist_shape", "q_dtype", "q_store_dtype", "H_not_multiple", "head_dim", "alias",
       "width_value", "count_value", "range_fp16"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BAD)
def test_bad_inputs(device, name):
    fn, exc, match, cpu_only = _bad(device)[name]
    if cpu_only and device != "cpu":
        pytest.skip("values are trusted on CUDA (no host sync)")
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_cuda_matches_cpu(dtype, D):
    """The same appends on both devices: the same page lists, bit-identical
    dequantized pages, attention within float32 rounding."""
    a, ref = _fill("cpu", dtype, 2, 4, 333, D, counts=[333, 200], s=seed("x", dtype, D), bounds=True)
    b, _ = _fill("cuda", dtype, 2, 4, 333, D, counts=[333, 200], s=seed("x", dtype, D), bounds=True, chunk=50)
    assert torch.equal(a.n_pages, b.n_pages.cpu())
    for x, y in zip(_by_position(a), _by_position(b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    q = torch.randn(2, 16, D).to(dtype)
    oa, pa = qaqp.attention(q, a, return_p_max=True)
    ob, pb = qaqp.attention(q.cuda(), b, return_p_max=True)
    torch.testing.assert_close(ob.cpu().float(), oa.float(), atol=2e-3 if dtype != torch.float32 else 2e-5, rtol=1e-2)
    torch.testing.assert_close(pb.cpu(), pa, atol=1e-5, rtol=1e-4)

