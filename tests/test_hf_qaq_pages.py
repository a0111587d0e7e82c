"""kvsparse.patch(method="qaq", layout="pages"): QAQ on width-binned pages in a
Hugging Face model (tiny random models, CPU)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import kvsparse  # noqa: E402
from kvsparse import hf, qaqp  # noqa: E402
from kvsparse.methods.qaq_pages import BinnedQuantKV  # noqa: E402

from test_chunked_prefill import _chunked, _forward, _reference  # noqa: E402
from test_hf_qaq import decode_step_and_query  # noqa: E402
from test_hf_patch import eager_and_compiled, greedy, left_pad, prompt, tiny_model  # noqa: E402

EIGHT = dict(allowed=(8,), requant_every=0, alpha=0.0, layout="pages")
ADAPT = dict(sigma=0.05, window=3, n_recent=2, layout="pages")
#: the per-channel key scale (QAQConfig.key_channel_scale)
CHANNEL = dict(ADAPT, key_channel_scale="absmax")


def _by_position(layer):
    """(keys, values, widths (wk, wv)) of a layer's tokens in position order."""
    st = layer.storage.st
    k, v, pos = qaqp.dequantize(st)
    T = int(layer.seq_lens.max())
    B, H, N, D = k.shape
    slot = torch.where(pos >= 0, pos, T).long()
    out = []
    for x in (k, v):
        dst = x.new_zeros(B, H, T + 1, D)
        dst.scatter_(2, slot[..., None].expand(B, H, N, D), x)
        out.append(dst[:, :, :T])
    # each slot's page class
    addr = st.pages.long()
    hdr = st.arena.view(-1, 16)[addr.clamp_min(0)][..., 8:10]  # [B, H, maxp, 2]
    cls = hdr.repeat_interleave(qaqp.PAGE, dim=2)[:, :, :N]
    w = torch.zeros(B, H, T + 1, 2, dtype=torch.uint8)
    w.scatter_(2, slot[..., None].expand(B, H, N, 2), cls)
    return out[0], out[1], w[:, :, :T]


def test_eight_bits_greedy_equals_unpatched():
    model = tiny_model(layers=2)
    ids = prompt(41)
    ref = greedy(model, ids, n=16)
    with hf.patched(model, method="qaq", **EIGHT):
        out = greedy(model, ids, n=16, return_dict_in_generate=True)
    cache = out.past_key_values
    assert torch.equal(out.sequences, ref)
    for layer in cache.layers:
        assert isinstance(layer.storage, BinnedQuantKV)
        assert layer.seq_lens.tolist() == [41 + 16 - 1]
        _, _, w = _by_position(layer)
        assert (w == 8).all()


def test_decode_step_is_the_paged_op():
    """One patched decode step equals kvsparse.qaqp.attention on the layer's store."""
    out, q, layer, attn = decode_step_and_query(tiny_model(layers=1), **ADAPT)
    y = qaqp.attention(q[:, :, 0].half().contiguous(), layer.storage.st, scale=attn.scaling).float()
    torch.testing.assert_close(out, attn.o_proj(y.reshape(1, 1, -1)))


def test_prompt_widths_settle_and_decode_tokens_get_the_largest():
    model = tiny_model(layers=2)
    ids = prompt(60)
    with hf.patched(model, method="qaq", **ADAPT):
        out = greedy(model, ids, n=6, return_dict_in_generate=True)
    lowered = False
    for layer in out.past_key_values.layers:
        _, _, w = _by_position(layer)
        assert (w[:, :, 60 - ADAPT["n_recent"]:] == 8).all()  # the newest prompt tokens, then the decode tokens
        lowered |= bool((w[:, :, :58] < 8).any())
        assert set(w.unique().tolist()) <= {2, 4, 8}
    assert lowered
    rep = out.past_key_values.memory_report()
    layer = out.past_key_values.layers[0]
    assert rep["fp16"] == 2 * 65 * layer.num_heads * layer.head_dim * 2 * 2  # layers x tokens x Hkv x D x K, V x 2 B


@pytest.mark.parametrize("kcs", [None, "sqrt"])
def test_static_cache_equals_dynamic_and_compiled_equals_eager(kcs):
    torch._dynamo.reset()
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=60 + n)[0] for n in (30, 19)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method="qaq", **ADAPT, key_channel_scale=kcs):
        c1 = hf.make_cache(model, batch_size=2, max_cache_len=48)
        static = greedy(model, ids, n=10, attention_mask=mask, **hf.cache_kwargs(model, c1))
        dyn = greedy(model, ids, n=10, attention_mask=mask, return_dict_in_generate=True)
        eager, compiled, c_eager, c_comp = eager_and_compiled(model, ids, mask)
    assert torch.equal(static, dyn.sequences)
    for ls, ld in zip(c1.layers, dyn.past_key_values.layers):
        assert torch.equal(ls.seq_lens, ld.seq_lens)
        if kcs is not None:
            assert torch.equal(ls.storage.kscale, ld.storage.kscale) and (ls.storage.kscale > 0).all()
        for a, b in zip(_by_position(ls), _by_position(ld)):
            assert torch.equal(a, b)
    assert c_eager.is_compileable
    assert torch.equal(compiled, eager)
    for le, lc in zip(c_eager.layers, c_comp.layers):
        for a, b in zip(_by_position(le), _by_position(lc)):
            assert torch.equal(a, b)
        for t in lc.state_tensors():
            assert getattr(t, "_dynamo_static_input_type", None) is not None


def _dequantized_past(cache, store):
    layers = cache.layers
    if not layers[0].is_initialized or layers[0].tokens_seen() == 0:
        store.append(None)
        return
    store.append([tuple(x.to(layer.model_dtype) for x in _keys_values(layer)) for layer in layers])


def _keys_values(layer):
    """The layer's keys and values in position order, the keys times the channel scale (if any)."""
    k, v, _ = _by_position(layer)
    s = layer.storage.kscale
    return (k if s is None else k * s[:, :, None]), v


@pytest.mark.parametrize("kcs", [None, "absmax"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("chunk", [16, 13])
def test_chunk_attends_dequantized_past_and_itself_exactly(kind, chunk, kcs):
    model = tiny_model(layers=2)
    dense = copy.deepcopy(model)
    ids = prompt(64, batch=2)
    pasts = []
    with kvsparse.patched(model, method="qaq", cache_dtype="float32", **ADAPT, key_channel_scale=kcs):
        cache = kvsparse.make_cache(model, max_cache_len=96 if kind == "static" else None)
        got = _chunked(model, ids, cache, chunk, before=lambda c: _dequantized_past(c, pasts))
    ref = _reference(dense, ids, chunk, pasts)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    exact = _forward(dense, ids, DynamicCache(config=dense.config), 0)
    assert (got[:, chunk:] - exact[:, chunk:]).abs().max() > 1e-2  # the past really is quantized


def test_beam_search_raises_clearly():
    model = tiny_model(layers=1)
    with hf.patched(model, method="qaq", **ADAPT):
        with pytest.raises(NotImplementedError, match="layout='pages'"):
            model.generate(prompt(20), max_new_tokens=3, num_beams=2, do_sample=False)


def test_layout_is_validated():
    with pytest.raises(ValueError, match="layout"):
        kvsparse.make_config("qaq", layout="binned")


# ------------------------------------------------------- key channel scale
def test_key_channel_scale_is_validated():
    with pytest.raises(ValueError, match="key_channel_scale needs layout='pages'"):
        kvsparse.make_config("qaq", key_channel_scale="absmax")
    with pytest.raises(ValueError, match="key_channel_scale must be"):
        kvsparse.make_config("qaq", layout="pages", key_channel_scale="rms")
    assert kvsparse.make_config("qaq", layout="pages", key_channel_scale="sqrt").key_channel_scale == "sqrt"


@pytest.mark.parametrize("kcs", ["absmax", "sqrt"])
def test_key_channel_scale_decode_equals_float64_reference(kcs):
    """The scale is the prompt keys' normalized channel absmax (or its root);
    one decode step equals float64 attention of the query over the stored keys
    times the scale (q . k = (q * s) . (k / s)), and the bound's query is q * s."""
    model = tiny_model(layers=1)
    dense = copy.deepcopy(model)
    out, q, layer, attn = decode_step_and_query(model, **dict(CHANNEL, key_channel_scale=kcs))
    st = layer.storage
    # the scale, from the 50 prompt keys
    c = DynamicCache(config=dense.config)
    with torch.no_grad():
        dense(prompt(50), **kvsparse.cache_kwargs(dense, c), use_cache=True)
    a = c.layers[0].keys[0].half().float().abs().amax(dim=1)  # [Hkv, D]
    a = a.sqrt() if kcs == "sqrt" else a
    torch.testing.assert_close(st.kscale[0].float(), a / a.square().mean(-1, keepdim=True).sqrt(), atol=2e-3, rtol=2e-3)
    # the decode step: float64, the real keys = stored keys x s (the new token's too)
    k, v = (x.double() for x in _keys_values(layer))  # [1, Hkv, 51, D]
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    p = torch.softmax(torch.einsum("bhd,bhtd->bht", q[:, :, 0].double(), k) * attn.scaling, dim=-1)
    y = torch.einsum("bht,bhtd->bhd", p, v).float()
    torch.testing.assert_close(out, attn.o_proj(y.reshape(1, 1, -1)), atol=3e-3, rtol=3e-3)
    # some prompt keys were lowered below 8 bits (the bound saw q * s and k / s)
    _, _, w = _by_position(layer)
    assert (w[..., 0] < 8).any()


def test_key_channel_scale_eight_bits_greedy_and_its_bytes():
    model = tiny_model(layers=2)
    ids = prompt(41)
    ref = greedy(model, ids, n=12)
    reps = []
    for kcs in (None, "absmax"):
        with hf.patched(model, method="qaq", **EIGHT, key_channel_scale=kcs):
            out = greedy(model, ids, n=12, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
        reps.append(out.past_key_values.memory_report())
    cache = out.past_key_values
    layer = cache.layers[0]
    # D fp16 scale values per (sequence, layer, KV head), nothing else changes
    extra = len(cache.layers) * layer.num_heads * layer.head_dim * 2
    assert reps[1]["total"] - reps[0]["total"] == extra
    assert reps[1]["scale_zero"] - reps[0]["scale_zero"] == extra
    cache.reset()
    assert all((lay.storage.kscale == 0).all() for lay in cache.layers)


# ------------------------------------------------------- page_requant
REQ = dict(ADAPT, page_requant=True, requant_every=2, compact_every=2)


def test_page_requant_is_validated():
    with pytest.raises(ValueError, match="page_requant needs layout='pages'"):
        kvsparse.make_config("qaq", page_requant=True)
    with pytest.raises(TypeError, match="page_requant"):
        kvsparse.make_config("qaq", layout="pages", page_requant=1)
    model = tiny_model(layers=1)
    with hf.patched(model, method="qaq", **REQ):
        with pytest.raises(ValueError, match="page_requant=True\\) needs a dynamic cache"):
            kvsparse.make_cache(model, batch_size=1, max_cache_len=64)


def test_page_requant_lowers_decode_tokens_widths_never_rise_and_compacts():
    """Decode tokens, stored at 8 bits, are lowered by the re-quantization;
    every position stays held exactly once; no width rises; the holes are
    compacted."""
    model = tiny_model(layers=2)
    ids = prompt(60)
    widths = []

    class Spy:  # widths per position after each generated token
        def __call__(self, input_ids, scores):
            widths.append([_by_position(layer)[2].clone() for layer in cache.layers])
            return scores

    with hf.patched(model, method="qaq", **REQ):
        cache = kvsparse.make_cache(model)
        model.generate(ids, max_new_tokens=14, do_sample=False, logits_processor=[Spy()],
                       **kvsparse.cache_kwargs(model, cache))
    T = 60 + 14 - 1
    lowered = False
    for i, layer in enumerate(cache.layers):
        st = layer.storage
        assert st.num_compactions >= 1
        _, _, pos = qaqp.dequantize(st.st)
        assert sorted(pos[pos >= 0].view(-1).tolist()) == sorted(list(range(T)) * st.num_heads)
        w = _by_position(layer)[2]
        assert (w[:, :, T - REQ["n_recent"]:] == 8).all()
        lowered |= bool((w[:, :, 60:T - REQ["n_recent"]] < 8).any())
        for a, b in zip(widths, widths[1:]):  # a position's widths never rise
            n = a[i].shape[2]
            assert (b[i][:, :, :n] <= a[i]).all()
    assert lowered
    assert cache.memory_report()["window"] > 0


def test_page_requant_lowers_mean_widths_over_settled_ones():
    """The tokens' mean widths fall below those that prefill and decode settle
    (at this size each class's partly filled 64-slot page, not the widths,
    decides the bytes: that is measured on the real models)."""
    model = tiny_model(layers=2)
    ids = prompt(60)
    mean = {}
    for on in (False, True):
        with hf.patched(model, method="qaq", **dict(REQ, page_requant=on)):
            out = greedy(model, ids, n=30, return_dict_in_generate=True)
        w = torch.cat([_by_position(layer)[2].float() for layer in out.past_key_values.layers], dim=1)
        mean[on] = w.mean().item()
    assert mean[True] < mean[False]
