"""Hostile inputs (issue 14): bad arguments raise a ValueError / TypeError that
names the argument, in-place ops reject overlapping tensors, NaN in q / keys /
scale gives NaN out (CPU and CUDA), and a short differential fuzz against the
float64 references in kvsparse.reference. The CUDA variants are marked ``gpu``
(skipped without a GPU); the CPU part runs in well under a minute on 2 cores."""
import math
import os
import sys

import numpy as np
import pytest
import torch

import kvsparse
from kvsparse import _kernels_np as knp
from kvsparse import qaq, quest, reference, sparq

sys.path.insert(0, os.path.dirname(__file__))
from kvs_testing import DEVICES, HAS_GPU  # noqa: E402

OPS = torch.ops.kvsparse
I32 = torch.int32
BIG = [2**31, 2**40, 2**62, 2**63 - 1]


def _lens(*v):
    return torch.tensor(v, dtype=I32)


def _base(seed=0, device="cpu", D=16):
    """Small valid inputs shared by the cases: B=1, H=2, Hkv=1, cap=40, D=16 (CUDA
    takes head_dim 64 or 128)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, D, generator=g).to(device)
    k = torch.randn(1, 1, 40, D, generator=g).to(device)
    v = torch.randn(1, 1, 40, D, generator=g).to(device)
    lens = _lens(40).to(device)
    kmin, kmax = quest.page_metadata(k, lens, 16)
    kt, vm = sparq.build(k, v, lens)
    return dict(q=q, k=k, v=v, lens=lens, kmin=kmin, kmax=kmax, kt=kt, vm=vm,
                idx=torch.zeros(1, 1, 1, dtype=I32, device=device))


def _store(shared=False, Hkv=2, D=16, cap=8, device="cpu", alpha=0.01):
    return qaq.alloc(1, Hkv, cap, D, torch.float32, device=device, shared=shared, alpha=alpha)


def _dev_base(seed, device):
    """_base with a head_dim every device takes."""
    return _base(seed, device, D=64)


# ---------------------------------------------------------------------------
# the sweep: (id, callable taking the base inputs, exception type, name in message)

def _case_list():
    c = []

    def add(cid, fn, exc, name):
        c.append(pytest.param(fn, exc, name, id=cid))

    # Quest: sizes (issue items 1, 2, 4)
    for P in BIG:
        add(f"quest.sparse_attention-P{P}", lambda a, P=P: quest.sparse_attention(
            a["q"], a["k"], a["v"], a["idx"], a["lens"], page_size=P), ValueError, "page_size")
        add(f"op.quest_page_metadata-P{P}", lambda a, P=P: OPS.quest_page_metadata(a["k"], a["lens"], P),
            ValueError, "page_size")
        add(f"np.attention-P{P}", lambda a, P=P: knp.attention(
            *(a[n].numpy() for n in ("q", "k", "v", "kmin", "kmax", "lens")), page_size=P, token_budget=P),
            ValueError, "page_size")
    add("quest.attention-P2**62-budget2**62", lambda a: quest.attention(
        a["q"], a["k"], a["v"], a["kmin"], a["kmax"], a["lens"], page_size=2**62, token_budget=2**62),
        ValueError, "page_size")
    add("op.quest_select_pages-P2**63-1", lambda a: OPS.quest_select_pages(
        torch.zeros(1, 1, 3), a["lens"], 2**63 - 1, 2**63 - 1), ValueError, "page_size")
    add("quest.page_metadata-P0", lambda a: quest.page_metadata(a["k"], a["lens"], 0), ValueError, "page_size")
    add("quest.page_metadata-P2**70", lambda a: quest.page_metadata(a["k"], a["lens"], 2**70),
        ValueError, "page_size")
    add("quest.page_metadata-P-str", lambda a: quest.page_metadata(a["k"], a["lens"], "16"),
        TypeError, "page_size")
    add("quest.page_metadata-k-int", lambda a: quest.page_metadata(a["k"].int(), a["lens"]), TypeError, "k")
    add("quest.page_metadata-k-3d", lambda a: quest.page_metadata(a["k"][0], a["lens"]), ValueError, "k")
    add("quest.page_metadata-k-noncontig", lambda a: quest.page_metadata(a["k"].transpose(2, 3), a["lens"]),
        ValueError, "k")
    add("quest.page_metadata-lens-int64", lambda a: quest.page_metadata(a["k"], a["lens"].long()),
        TypeError, "seq_lens")
    add("quest.page_metadata-lens-range", lambda a: quest.page_metadata(a["k"], _lens(41)), ValueError, "seq_lens")
    add("quest.sparse_attention-idx-range", lambda a: quest.sparse_attention(
        a["q"], a["k"], a["v"], torch.full((1, 1, 1), 3, dtype=I32), a["lens"]), ValueError, "page_idx")
    add("quest.sparse_attention-v-dtype", lambda a: quest.sparse_attention(
        a["q"], a["k"], a["v"].half(), a["idx"], a["lens"]), TypeError, "v")
    add("quest.sparse_attention-scale-str", lambda a: quest.sparse_attention(
        a["q"], a["k"], a["v"], a["idx"], a["lens"], scale="x"), TypeError, "scale")
    add("quest.attention-budget", lambda a: quest.attention(
        a["q"], a["k"], a["v"], a["kmin"], a["kmax"], a["lens"], page_size=16, token_budget=8),
        ValueError, "token_budget")
    add("quest.page_scores-kmax-shape", lambda a: quest.page_scores(
        a["q"], a["kmin"], a["kmax"][:, :, :2], a["lens"]), ValueError, "kmax")
    add("quest.select_pages-scores-f64", lambda a: quest.select_pages(torch.zeros(1, 1, 3, dtype=torch.float64),
                                                                      a["lens"]), TypeError, "scores")
    # aliasing (item 5)
    add("quest.update_metadata-kmin-is-kmax", lambda a: quest.update_metadata(
        a["k"], a["kmin"], a["kmin"], a["lens"] * 0, a["lens"], 16), ValueError, "kmin")
    add("quest.update_metadata-kmin-view-of-k", lambda a: quest.update_metadata(
        a["k"], a["k"][:, :, :3], a["kmax"], a["lens"] * 0, a["lens"], 16), ValueError, "kmin")
    add("op.quest_update_metadata-kmax-view-of-k", lambda a: OPS.quest_update_metadata(
        a["k"], a["kmin"], a["k"][:, :, 37:], a["lens"] * 0, a["lens"], 16), ValueError, "kmax")
    add("sparq.append-src-view-of-cache", lambda a: sparq.append(
        a["k"][:, :, 0:4], a["v"][:, :, 0:4], a["k"], a["v"], a["kt"], a["vm"], _lens(4)), ValueError, "k")
    add("sparq.append-kt-view-of-k", lambda a: sparq.append(
        a["k"][:, :, :1].clone(), a["v"][:, :, :1].clone(), a["k"], a["v"], a["k"].view(1, 1, -1, 40), a["vm"],
        _lens(4)), ValueError, "kt")
    add("np.update_metadata-kmin-view-of-k", lambda a: knp.update_metadata(
        a["k"].numpy(), a["k"].numpy()[:, :, :3], a["kmax"].numpy().copy(), np.zeros(1, np.int32),
        a["lens"].numpy(), 16), ValueError, "kmin")
    # SparQ arguments
    add("sparq.top_channels-r0", lambda a: sparq.top_channels(a["q"], 0), ValueError, "r")
    add("sparq.top_channels-r-big", lambda a: sparq.top_channels(a["q"], 2**70), ValueError, "r")
    add("sparq.top_channels-group0", lambda a: sparq.top_channels(a["q"], 4, 0), ValueError, "group_size")
    add("sparq.top_positions-k0", lambda a: sparq.top_positions(torch.rand(1, 2, 40), a["lens"], 0),
        ValueError, "k")
    add("sparq.top_positions-window", lambda a: sparq.top_positions(torch.rand(1, 2, 40), a["lens"], 4, -1),
        ValueError, "local_window")
    add("sparq.sparse_attention-i2-range", lambda a: sparq.sparse_attention(
        a["q"], a["k"], a["v"], torch.full((1, 1, 1), 40, dtype=I32), torch.rand(1, 2, 40), a["vm"], a["lens"]),
        ValueError, "i2")
    add("sparq.attention-k_top", lambda a: sparq.attention(a["q"], a["k"], a["v"], a["kt"], a["vm"], a["lens"],
                                                           4, 41), ValueError, "k_top")
    # QAQ (items 3, 6, 8)
    add("qaq.alloc-group-too-large", lambda a: qaq.alloc(1, 160, 1, 256, torch.float32, alpha=1e-6, shared=True),
        ValueError, "num_kv_heads")
    add("qaq.alloc-heads0", lambda a: qaq.alloc(1, 0, 4, 16), ValueError, "num_kv_heads")
    add("qaq.quantize-head_dim", lambda a: qaq.quantize(_store(), torch.randn(1, 2, 1, 8), _lens(0)),
        ValueError, "x")
    add("qaq.quantize-heads-shared", lambda a: qaq.quantize(_store(shared=True), torch.randn(1, 4, 1, 16), _lens(0)),
        ValueError, "x")
    add("op.qaq_quantize-offsets-overlap", lambda a: OPS.qaq_quantize(
        torch.randn(1, 2, 2, 16), _lens(0), torch.full((1, 2, 2), 8, dtype=torch.uint8),
        torch.zeros(1, 2, 2, dtype=I32), *_store().tensors(), 2, 16), ValueError, "new_offsets")
    add("op.qaq_quantize-group-too-large", lambda a: OPS.qaq_quantize(
        torch.randn(1, 160, 1, 256), _lens(0), torch.zeros(1, 1, 1, dtype=torch.uint8),
        torch.zeros(1, 1, 1, dtype=I32), torch.zeros(1, 8, dtype=torch.uint8), torch.zeros(1, 1, 1, dtype=I32),
        torch.zeros(1, 1, 1, dtype=torch.uint8), torch.zeros(1, 1, 1, 2, dtype=torch.float16),
        torch.zeros(1, 1, 1, 2, dtype=torch.int16), torch.zeros(1, 1, 1, 2), 160, 256), ValueError, "head_dim")

    def x_in_arena(a):
        st = _store()
        x = st.arena[:, :128].view(torch.float32).view(1, 2, 1, 16)
        OPS.qaq_quantize(x, _lens(0), torch.full((1, 2, 1), 8, dtype=torch.uint8),
                         st.offsets[:, :, :1].contiguous(), *st.tensors(), 2, 16)
    add("op.qaq_quantize-x-view-of-arena", x_in_arena, ValueError, "arena")

    def requant_alias(a):
        st = _store()
        OPS.qaq_requantize(*st.tensors(), st.widths, _lens(0), 2, 16)
    add("op.qaq_requantize-new_widths-is-widths", requant_alias, ValueError, "widths")
    add("qaq.attention-q-head_dim", lambda a: qaq.attention(torch.randn(1, 2, 32), _store(), _store(), _lens(1)),
        ValueError, "q")
    add("op.qaq_quantize-x-head_dim", lambda a: OPS.qaq_quantize(
        torch.randn(1, 2, 1, 8), _lens(0), torch.full((1, 2, 1), 8, dtype=torch.uint8),
        _store().offsets[:, :, :1].contiguous(), *_store().tensors(), 2, 16), ValueError, "x")
    add("op.qaq_quantize-x-heads", lambda a: OPS.qaq_quantize(
        torch.randn(1, 4, 1, 16), _lens(0), torch.zeros(1, 1, 1, dtype=torch.uint8),
        torch.zeros(1, 1, 1, dtype=I32), *_store(shared=True).tensors(), 2, 16), ValueError, "x")

    def op_attention_head_dim(a):
        st = _store()
        qaq.quantize(st, torch.randn(1, 2, 2, 16), _lens(0), 4)
        OPS.qaq_attention(torch.randn(1, 2, 32), *st.tensors(), *st.tensors(), _lens(2), 2, 16, 0.25, False)
    add("op.qaq_attention-q-head_dim", op_attention_head_dim, ValueError, "q")

    def op_sparse_attention_head_dim(a):
        st = _store()
        qaq.quantize(st, torch.randn(1, 2, 2, 16), _lens(0), 4)
        OPS.qaq_sparse_attention(torch.randn(1, 2, 8), *st.tensors(), *st.tensors(),
                                 torch.zeros(1, 2, 1, dtype=I32), _lens(2), 2, 16, 4, 0.25, False)
    add("op.qaq_sparse_attention-q-head_dim", op_sparse_attention_head_dim, ValueError, "q")
    # finite values beyond what QAQ's fp16 scale / zero hold (qaq.h): a clear error, not NaN
    for dt in (torch.float32, torch.bfloat16):
        for big in (1e5, 1e37):
            add(f"qaq.quantize-beyond-fp16-{dt}-{big:g}", lambda a, dt=dt, big=big: qaq.quantize(
                qaq.alloc(1, 2, 8, 16, dt, alpha=0.0), (torch.randn(1, 2, 2, 16) * big).to(dt), _lens(0), 4),
                ValueError, "x")
    add("qaq.quantize-range-beyond-fp16", lambda a: qaq.quantize(
        _store(alpha=0.0), torch.linspace(-4e4, 4e4, 16).expand(1, 2, 2, 16).contiguous(), _lens(0), 8), ValueError, "x")
    # no backward: a tensor that requires grad under grad mode is refused, naming it
    add("quest.attention-q-requires-grad", lambda a: quest.attention(
        a["q"].requires_grad_(), a["k"], a["v"], a["kmin"], a["kmax"], a["lens"], 16, 32), ValueError, "q")
    add("quest.sparse_attention-v-requires-grad", lambda a: quest.sparse_attention(
        a["q"], a["k"], a["v"].requires_grad_(), a["idx"], a["lens"], 16), ValueError, "v")
    add("quest.page_metadata-k-requires-grad", lambda a: quest.page_metadata(
        a["k"].requires_grad_(), a["lens"], 16), ValueError, "k")
    add("sparq.attention-k-requires-grad", lambda a: sparq.attention(
        a["q"], a["k"].requires_grad_(), a["v"], a["kt"], a["vm"], a["lens"], 4, 8), ValueError, "k")
    add("qaq.attention-q-requires-grad", lambda a: qaq.attention(
        torch.randn(1, 2, 16, requires_grad=True), _store(), _store(), _lens(0)), ValueError, "q")
    add("qaq.quantize-x-requires-grad", lambda a: qaq.quantize(
        _store(), torch.randn(1, 2, 1, 16, requires_grad=True), _lens(0)), ValueError, "x")
    add("qaq.attention-store-type", lambda a: qaq.attention(a["q"], None, _store(), _lens(1)), TypeError, "k_store")
    add("qaq.query_sq-groups0", lambda a: qaq.query_sq(a["q"], 0), ValueError, "groups")
    add("qaq.query_sq-groups3", lambda a: qaq.query_sq(a["q"], 3), ValueError, "groups")
    add("qaq.query_sq-q-2d", lambda a: qaq.query_sq(a["q"][0], 1), ValueError, "q")
    add("qaq.AttentionWindow.s_max-0", lambda a: qaq.AttentionWindow(1, 2, 4).s_max(0), ValueError, "groups")
    add("qaq.AttentionWindow-n0", lambda a: qaq.AttentionWindow(1, 2, 4, n=0), ValueError, "n")
    add("qaq.key_bits-allowed", lambda a: qaq.key_bits(torch.rand(1, 2, 4), torch.rand(1, 2), _lens(4), 0.1, [3]),
        ValueError, "allowed")
    add("qaq.key_bits-n_recent", lambda a: qaq.key_bits(torch.rand(1, 2, 4), torch.rand(1, 2), _lens(4), 0.1,
                                                        n_recent=-1), ValueError, "n_recent")
    add("qaq.key_bits-sigma-str", lambda a: qaq.key_bits(torch.rand(1, 2, 4), torch.rand(1, 2), _lens(4), "x"),
        TypeError, "sigma_s")
    add("qaq.outlier_slots-alpha", lambda a: qaq.outlier_slots(1.5, 16), ValueError, "alpha")
    add("qaq.slot_offsets-max_width", lambda a: qaq.slot_offsets(_store(), 3), ValueError, "max_width")
    add("qaq.packed_offsets-group_elems", lambda a: qaq.packed_offsets(torch.zeros(1, 1, 2, dtype=torch.uint8), 0),
        ValueError, "group_elems")
    add("op.qaq_dequantize-heads0", lambda a: OPS.qaq_dequantize(*_store().tensors(), _lens(0), 0, 16),
        ValueError, "num_kv_heads")
    # NumPy module
    add("np.page_metadata-P0", lambda a: knp.page_metadata(a["k"].numpy(), a["lens"].numpy(), 0),
        ValueError, "page_size")
    add("np.page_metadata-k-f64", lambda a: knp.page_metadata(a["k"].double().numpy(), a["lens"].numpy()),
        TypeError, "k")
    add("np.page_metadata-lens-int64", lambda a: knp.page_metadata(a["k"].numpy(), a["lens"].long().numpy()),
        TypeError, "seq_lens")
    add("np.select_pages-budget", lambda a: knp.select_pages(np.zeros((1, 1, 3), np.float32), a["lens"].numpy(),
                                                            16, 8), ValueError, "token_budget")
    add("np.sparse_attention-idx", lambda a: knp.sparse_attention(
        a["q"].numpy(), a["k"].numpy(), a["v"].numpy(), np.full((1, 1, 1), 9, np.int32), a["lens"].numpy()),
        ValueError, "page_idx")
    add("np.sparq_build-v", lambda a: knp.sparq_build(a["k"].numpy(), a["v"][:, :, :8].contiguous().numpy(),
                                                      a["lens"].numpy()), ValueError, "v")
    for k_top in (0, 41, 2**40):
        add(f"np.sparq_attention-k_top{k_top}", lambda a, k_top=k_top: knp.sparq_attention(
            *(a[n].numpy() for n in ("q", "k", "v", "kt", "vm", "lens")), 4, k_top), ValueError, "k_top")
    add("np.sparq_attention-r", lambda a: knp.sparq_attention(
        *(a[n].numpy() for n in ("q", "k", "v", "kt", "vm", "lens")), 17, 8), ValueError, "r (")
    add("np.qaq_attention-widths", lambda a: knp.qaq_attention(
        a["q"].numpy(), *[_np_store(w=5)] * 2, _lens(8).numpy(), 2), ValueError, "k_widths")
    add("np.qaq_attention-offsets", lambda a: knp.qaq_attention(
        a["q"].numpy(), _np_store(), _np_store(off=2**30), _lens(8).numpy(), 2), ValueError, "v_offsets")
    add("np.qaq_attention-oidx", lambda a: knp.qaq_attention(
        a["q"].numpy(), _np_store(oidx=16), _np_store(), _lens(8).numpy(), 2), ValueError, "k_oidx")
    add("np.qaq_attention-heads", lambda a: knp.qaq_attention(
        a["q"].numpy(), _np_store(), _np_store(), _lens(8).numpy(), 3), ValueError, "Hkv")
    return c


def _np_store(w=None, off=None, oidx=None):
    """The six arrays of a valid QAQ store (B=1, Hkv=2, cap=8, D=16) for the NumPy
    module, with one value made bad on request."""
    st = _store(alpha=0.2)
    qaq.quantize(st, torch.randn(1, 2, 8, 16), _lens(0), 4)
    a = [t.numpy().copy() for t in st.tensors()]
    if w is not None:
        a[2][0, 1, 3] = w
    if off is not None:
        a[1][0, 0, 5] = off
    if oidx is not None:
        a[4][0, 1, 7, 0] = oidx
    return tuple(a)


@pytest.mark.parametrize("fn,exc,name", _case_list())
def test_bad_input_raises_naming_the_argument(fn, exc, name):
    a = _base()
    with pytest.raises(exc) as ei:
        fn(a)
    assert name in str(ei.value), f"message does not name {name!r}: {ei.value}"


# On CUDA the values of seq_lens, page_idx and i2 are trusted (README: reading them would
# need a host sync; the kernels clamp lengths and skip positions outside [0, len)): these
# cases run without raising there, and must not read out of bounds (compute-sanitizer).
CUDA_VALUES_TRUSTED = {"quest.page_metadata-lens-range", "quest.sparse_attention-idx-range",
                       "sparq.sparse_attention-i2-range"}


def _cuda_case_list():
    """The torch-op / wrapper cases of Quest and SparQ on CUDA tensors. Left out: the
    NumPy-module cases (CPU only) and the QAQ cases (they build head_dim-16 CPU stores,
    not CUDA inputs; QAQ's CUDA binding checks are covered by tests/test_qaq.py)."""
    return [p for p in _case_list() if p.id.startswith(("quest.", "op.quest_", "sparq."))]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and kvsparse built with CUDA")
@pytest.mark.parametrize("fn,exc,name", _cuda_case_list())
def test_bad_input_raises_naming_the_argument_cuda(fn, exc, name, request):
    """The same cases with the base tensors on CUDA (head_dim 64) and every tensor a case
    makes created on CUDA (default device)."""
    cid = request.node.callspec.id
    a = _dev_base(0, "cuda")
    with torch.device("cuda"):
        if cid in CUDA_VALUES_TRUSTED:
            fn(a)  # no exception: the values are not checked on CUDA
            torch.cuda.synchronize()
            return
        with pytest.raises(exc) as ei:
            fn(a)
    assert name in str(ei.value), f"message does not name {name!r}: {ei.value}"


# ---------------------------------------------------------------------------
# large page sizes that are allowed behave as one page per sequence

@pytest.mark.parametrize("P", [1000, 2**31 - 1])
def test_huge_page_size_is_one_page(P):
    a = _base(1)
    ref = reference.dense_attention_ref(a["q"], a["k"], a["v"], a["lens"])
    out = quest.sparse_attention(a["q"], a["k"], a["v"], a["idx"], a["lens"], page_size=P)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    kmin, kmax = quest.page_metadata(a["k"], a["lens"], P)
    assert kmin.shape[2] == 1
    torch.testing.assert_close(kmin[:, :, 0], a["k"].amin(2))
    out2 = quest.attention(a["q"], a["k"], a["v"], kmin, kmax, a["lens"], page_size=P, token_budget=2**62)
    torch.testing.assert_close(out2.double(), ref, atol=2e-5, rtol=1e-4)
    idx = quest.select_pages(quest.page_scores(a["q"], kmin, kmax, a["lens"], P), a["lens"], P, 2**63 - 1)
    assert idx.tolist() == [[[0]]]


def test_qaq_largest_group_ok():
    st = qaq.alloc(1, 128, 1, 256, torch.float32, alpha=1e-4, shared=True)  # E = 32768
    assert st.group_elems == qaq.MAX_GROUP_ELEMS
    x = torch.randn(1, 128, 1, 256)
    x[0, 127, 0, 255] = 100.0  # the outlier with the largest index
    qaq.quantize(st, x, _lens(0), widths=8)
    assert int(st.oidx.max()) == 32767
    d = qaq.dequantize(st, _lens(1))
    assert float(d[0, 127, 0, 255]) == 100.0


# ---------------------------------------------------------------------------
# NaN / Inf policy (CPU and CUDA): NaN in q, a selected key or scale gives NaN, as dense

def _nan_q(a):
    q = a["q"].clone()
    q[0, 0, 3] = float("nan")
    return q


@pytest.mark.parametrize("device", DEVICES)
def test_nan_query_quest_sparq_numpy(device):
    a = _dev_base(2, device)
    q = _nan_q(a)
    out = quest.sparse_attention(q, a["k"], a["v"], a["idx"], a["lens"])
    assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()
    out = quest.attention(q, a["k"], a["v"], a["kmin"], a["kmax"], a["lens"], 16, 32, mode="head")
    assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()
    out = sparq.sparse_attention(q, a["k"], a["v"], torch.arange(8, dtype=I32, device=device).view(1, 1, 8),
                                 torch.rand(1, 2, 40, device=device), a["vm"], a["lens"])
    assert out[0, 0].isnan().all()
    out = sparq.attention(q, a["k"], a["v"], a["kt"], a["vm"], a["lens"], 4, 8, mode="head")
    assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()
    if device == "cpu":
        out = knp.sparse_attention(q.numpy(), a["k"].numpy(), a["v"].numpy(), a["idx"].numpy(), a["lens"].numpy())
        assert np.isnan(out[0, 0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_nonfinite_scale_gives_nan(scale, device):
    a = _dev_base(3, device)
    out = quest.attention(a["q"], a["k"], a["v"], a["kmin"], a["kmax"], a["lens"], 16, 32, scale=scale)
    assert out.isnan().all()
    out = sparq.attention(a["q"], a["k"], a["v"], a["kt"], a["vm"], a["lens"], 4, 8, scale=scale)
    assert out.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_key_reaches_metadata_and_output(device):
    a = _dev_base(4, device)
    k = a["k"].clone()
    k[0, 0, 5, 3] = float("nan")  # not the first token of page 0
    kmin, kmax = quest.page_metadata(k, a["lens"], 16)
    assert kmin[0, 0, 0, 3].isnan() and kmax[0, 0, 0, 3].isnan()
    assert not kmin[0, 0, 1:].isnan().any()
    if device == "cpu":
        kmin_np, _ = knp.page_metadata(k.numpy(), a["lens"].numpy(), 16)
        assert np.isnan(kmin_np[0, 0, 0, 3])
    s = quest.page_scores(a["q"], kmin, kmax, a["lens"], 16)
    assert s[0, 0, 0].isnan()
    # the NaN page ranks first, so a budget of two pages selects it with the last page
    idx = quest.select_pages(s, a["lens"], 16, 32)
    assert idx.tolist() == [[[0, 2]]]
    out = quest.attention(a["q"], k, a["v"], kmin, kmax, a["lens"], 16, 32)
    assert out.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_rule_long_sequence(device):
    """All -inf, +inf and one NaN logit late in a 512-token row (split-K on CUDA); no token: zeros."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, 64, generator=g)
    k = torch.randn(1, 1, 512, 64, generator=g)
    v = torch.randn(1, 1, 512, 64, generator=g)
    lens = _lens(512)
    idx = torch.arange(32, dtype=I32).view(1, 1, 32)
    i2 = torch.arange(512, dtype=I32).view(1, 1, 512).expand(1, 2, 512).contiguous()
    s_hat = torch.rand(1, 2, 512, generator=g)
    vm = v.mean(2)

    def run(q, k, lens):
        q, k, lens = q.to(device), k.to(device), lens.to(device)
        vv = v.to(device)
        return (quest.sparse_attention(q, k, vv, idx.to(device), lens),
                sparq.sparse_attention(q, k, vv, i2.to(device), s_hat.to(device), vm.to(device), lens))

    for out in run(q, k, lens):
        assert not out.isnan().any()
    k1, q1 = k.clone(), q.clone()
    k1[..., 0] = 1.0
    q1[0, :, 1:] = 0.0
    q1[0, 0, 0], q1[0, 1, 0] = -math.inf, 1.0  # head 0: every logit -inf
    for out in run(q1, k1, lens):
        assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()
    k2, q2 = k.clone(), q.clone()
    k2[0, 0, 400, 0] = math.inf
    q2[0, 0, 0], q2[0, 1, 0] = 1.0, -1.0  # token 400: +inf for head 0, -inf (weight 0) for head 1
    for out in run(q2, k2, lens):
        assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()
    k3 = k.clone()
    k3[0, 0, 500, 5] = math.nan
    for out in run(q, k3, lens):
        assert out.isnan().all()
    oq, os_ = run(q, k3, _lens(0))  # no token: zeros (SparQ then mixes in the mean value)
    assert (oq == 0).all() and not os_.isnan().any()


def test_qaq_large_finite_values_within_fp16_stay_finite():
    """Values near (not beyond) what fp16 scale / zero hold quantize and attend finitely;
    the group beyond is refused and the store's other tokens are untouched."""
    st_k, st_v = _store(alpha=0.0), _store(alpha=0.0)
    x = torch.rand(1, 2, 3, 16, generator=torch.Generator().manual_seed(3)) * 3e4 + 3e4  # in [3e4, 6e4]
    qaq.quantize(st_k, x, _lens(0), 8)
    qaq.quantize(st_v, x, _lens(0), 8)
    d = qaq.dequantize(st_k, _lens(3))[:, :, :3]
    assert torch.isfinite(d).all() and (d - x).abs().max() < 3e4 / 255
    out = qaq.attention(torch.randn(1, 2, 16) * 1e-4, st_k, st_v, _lens(3))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="x holds a group"):
        qaq.quantize(st_k, torch.full((1, 2, 1, 16), 7e4), _lens(3), 8)
    assert torch.equal(qaq.dequantize(st_k, _lens(3))[:, :, :3], d)  # the stored tokens are untouched


@pytest.mark.parametrize("seed", range(4))
def test_qaqp_ops_on_a_corrupt_arena_stay_in_bounds(seed):
    """Every paged-QAQ op over random arena bytes and random page addresses
    (valid, out of range, misaligned into another page, -1) reads and writes
    inside its buffers (the sanitizer CI step runs this file under ASan) and
    returns without error."""
    from kvsparse import qaqp
    g = torch.Generator().manual_seed(seed)
    B, Hkv, D, L = 2, 2, 64, 6
    st = qaqp.alloc(B, Hkv, D, 200, dtype=torch.float16, bounds=True)
    k = torch.randn(B, Hkv, 150, D, generator=g).half()
    qaqp.append(st, k, k, 4, 8, torch.zeros(B, dtype=I32))
    A = st.arena.numel() // 16
    top = int(st.top)
    # corrupt: random bytes over part of the used arena, and random addresses in the lists
    n = int(torch.randint(1, max(2, 16 * top // 4), (1,), generator=g))
    at = int(torch.randint(0, max(1, 16 * top - n), (1,), generator=g))
    st.arena[at:at + n] = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    plist = torch.randint(-3, A + 40, (B, Hkv, L), generator=g, dtype=I32)
    plist[..., :2] = st.pages[..., :2]
    st.pages[..., 1] = torch.randint(-2, A + 40, (B, Hkv), generator=g, dtype=I32)
    st.n_pages.copy_(torch.randint(-1, st.pages.shape[2] + 3, (B, Hkv), generator=g, dtype=I32))
    q = torch.randn(B, 4, D, generator=g).half()
    qaqp.dequantize(st, plist)
    qaqp.attention(q, st, plist, return_p_max=True)
    nk = torch.randint(0, 256, (B, Hkv, L, 64), generator=g, dtype=torch.uint8)
    OPS.qaqp_requant_take(st.arena, plist, nk, nk.flip(-1).contiguous(), 40, D, torch.float16, 2, 2, True)
    qaqp.compact(st, arena_bytes=16 * top)
    qaqp.compact(st, arena_bytes=16 * (top // 3))


def test_no_backward_under_no_grad_or_detached():
    """kvsparse's ops refuse tensors that require grad only under grad mode."""
    a = _base()
    q = a["q"].clone().requires_grad_()
    with torch.no_grad():
        out = quest.attention(q, a["k"], a["v"], a["kmin"], a["kmax"], a["lens"], 16, 32)
    assert not out.requires_grad
    with torch.inference_mode():
        quest.attention(q, a["k"], a["v"], a["kmin"], a["kmax"], a["lens"], 16, 32)
    ref = quest.attention(q.detach(), a["k"], a["v"], a["kmin"], a["kmax"], a["lens"], 16, 32)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_qaq_nonfinite_group_gives_nan_attention(device):
    D = 64
    st_k, st_v = _store(D=D, device=device), _store(D=D, device=device)
    x = torch.randn(1, 2, 3, D, generator=torch.Generator().manual_seed(6)).to(device)
    zero, three = _lens(0).to(device), _lens(3).to(device)
    qaq.quantize(st_k, x, zero)
    qaq.quantize(st_v, x, zero)
    q = torch.randn(1, 2, D, generator=torch.Generator().manual_seed(7)).to(device)
    assert not qaq.attention(q, st_k, st_v, three).isnan().any()
    x2 = x.clone()
    x2[0, 0, 1, :3] = float("inf")  # more infinities than outlier slots
    qaq.quantize(st_k, x2, zero)
    out = qaq.attention(q, st_k, st_v, three)
    assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()
    q2 = q.clone()
    q2[0, 1, 0] = float("nan")
    qaq.quantize(st_k, x, zero)
    out = qaq.attention(q2, st_k, st_v, three)
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("shared", [False, True], ids=["head", "shared"])
def test_qaq_nan_key_gives_nan_attention_any_alpha(alpha, shared, device):
    """One NaN in a key reaches the attention whatever alpha (qaq.h): it ranks first in the
    outlier selection, so with outlier slots it is stored as an outlier (exactly) and the
    rest of the group stays finite; with alpha = 0 it is an inlier and the group's range
    (and every element of the group) is NaN."""
    D = 64
    st_k = qaq.alloc(1, 2, 4, D, torch.float32, device=device, alpha=alpha, shared=shared)
    st_v = qaq.alloc(1, 2, 4, D, torch.float32, device=device, alpha=alpha, shared=shared)
    x = torch.randn(1, 2, 3, D, generator=torch.Generator().manual_seed(5)).to(device)
    x2 = x.clone()
    x2[0, 1, 2, 7] = float("nan")
    zero, three = _lens(0).to(device), _lens(3).to(device)
    qaq.quantize(st_k, x2, zero)
    qaq.quantize(st_v, x, zero)
    q = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(8)).to(device)
    out = qaq.attention(q, st_k, st_v, three)
    d = qaq.dequantize(st_k, three)
    g = 0 if shared else 1
    if alpha > 0:
        assert int(st_k.oidx[0, g, 2, 0]) == (D + 7 if shared else 7)
        assert int(d[0, 1, 2].isnan().sum()) == 1 and not d[0, 0, 2].isnan().any()
    else:
        assert d[0, 1, 2].isnan().all() and d[0, 0, 2].isnan().all() == shared
    assert out[0, 2:].isnan().all()  # query heads 2, 3 read KV head 1
    assert out[0, :2].isnan().all() == (shared and alpha == 0)
    assert not out[0, :2].isnan().any() or (shared and alpha == 0)


# ---------------------------------------------------------------------------
# bounded differential fuzz against the float64 references

hyp = pytest.importorskip("hypothesis")
st = hyp.strategies
FUZZ = hyp.settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=list(hyp.HealthCheck))


@st.composite
def shapes(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    D = draw(st.sampled_from([8, 16, 24]))
    cap = draw(st.integers(1, 48))
    lens = draw(st.lists(st.integers(0, cap), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hkv * G, Hkv, cap, D, lens, seed


def _qkv(B, H, Hkv, cap, D, lens, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, cap, D, generator=g),
            torch.randn(B, Hkv, cap, D, generator=g), torch.tensor(lens, dtype=I32))


@FUZZ
@hyp.given(shapes(), st.integers(1, 9), st.integers(1, 64), st.booleans())
def test_fuzz_quest_attention(shp, P, budget, group):
    B, H, Hkv, cap, D, lens, seed = shp
    budget = max(budget, P)
    q, k, v, L = _qkv(*shp)
    kmin, kmax = quest.page_metadata(k, L, P)
    torch.testing.assert_close(kmin.double(), reference.quest_page_metadata_ref(k, L, P)[0].to(kmin.device),
                               atol=0, rtol=0, check_dtype=False)
    scores = quest.page_scores(q, kmin, kmax, L, P, "group" if group else "head")
    out = quest.attention(q, k, v, kmin, kmax, L, P, budget, "group" if group else "head")
    ref = reference.quest_attention_ref(q, k, v, kmin, kmax, L, P, budget, group, scores=scores)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@FUZZ
@hyp.given(shapes(), st.integers(1, 8), st.integers(1, 16), st.booleans())
def test_fuzz_sparq_sparse_attention(shp, r, k_top, group):
    B, H, Hkv, cap, D, lens, seed = shp
    r, k_top = min(r, D), min(k_top, cap)
    q, k, v, L = _qkv(*shp)
    kt, vm = sparq.build(k, v, L)
    gs = H // Hkv if group else 1
    i1 = sparq.top_channels(q, r, gs)
    s_hat = sparq.approx_scores(q, kt, i1, L)
    i2 = sparq.top_positions(s_hat, L, k_top, 1, gs)
    out = sparq.sparse_attention(q, k, v, i2, s_hat, vm, L)
    ref = reference.sparq_sparse_attention_ref(q, k, v, i2, s_hat, vm, L)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@FUZZ
@hyp.given(shapes(), st.sampled_from([0, 1, 2, 4, 8]), st.booleans())
def test_fuzz_qaq_attention(shp, w, shared):
    B, H, Hkv, cap, D, lens, seed = shp
    q, k, v, L = _qkv(*shp)
    ks = qaq.alloc(B, Hkv, cap, D, torch.float32, alpha=0.1, shared=shared)
    vs = qaq.alloc(B, Hkv, cap, D, torch.float32, alpha=0.1, shared=shared)
    zero = torch.zeros(B, dtype=I32)
    qaq.quantize(ks, k, zero, widths=w)
    qaq.quantize(vs, v, zero, widths=w)
    kd = reference.qaq_dequantize_ref(*ks.tensors(), L, Hkv, D)
    vd = reference.qaq_dequantize_ref(*vs.tensors(), L, Hkv, D)
    torch.testing.assert_close(qaq.dequantize(ks, L).double(), kd, atol=0, rtol=0)
    out = qaq.attention(q, ks, vs, L)
    ref = reference.qaq_attention_ref(q, kd, vd, L)[0]
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-4)


def test_list_or_numpy_where_a_tensor_belongs_is_a_type_error_naming_it():
    import numpy as np

    from kvsparse import qaq, quest, sparq

    B, H, Hkv, S, D = 1, 4, 2, 64, 64
    k = torch.randn(B, Hkv, S, D)
    v = torch.randn_like(k)
    q = torch.randn(B, H, D)
    sl = torch.full((B,), S, dtype=torch.int32)
    kmin, kmax = quest.page_metadata(k, sl, page_size=16)
    cases = [
        ("seq_lens", lambda: quest.attention(q, k, v, kmin, kmax, [S], page_size=16, token_budget=32)),
        ("k", lambda: quest.page_metadata(np.zeros((B, Hkv, S, D), np.float32), sl, page_size=16)),
        ("seq_lens", lambda: sparq.build(k, v, [S])),
        ("q", lambda: quest.page_scores(q.tolist(), kmin, kmax, sl, 16)),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=rf"\b{name} must be a torch.Tensor") as e:
            call()
        assert len(str(e.value)) < 200  # not the whole value dumped
    store = qaq.alloc(B, Hkv, S, D, torch.float16, "cpu")
    with pytest.raises(TypeError, match=r"x must be in the store's dtype torch.float16"):
        qaq.quantize(store, k, torch.zeros(B, dtype=torch.int32))
