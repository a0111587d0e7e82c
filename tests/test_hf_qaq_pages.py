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


def test_static_cache_equals_dynamic_and_compiled_equals_eager():
    torch._dynamo.reset()
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=60 + n)[0] for n in (30, 19)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method="qaq", **ADAPT):
        c1 = hf.make_cache(model, batch_size=2, max_cache_len=48)
        static = greedy(model, ids, n=10, attention_mask=mask, **hf.cache_kwargs(model, c1))
        dyn = greedy(model, ids, n=10, attention_mask=mask, return_dict_in_generate=True)
        eager, compiled, c_eager, c_comp = eager_and_compiled(model, ids, mask)
    assert torch.equal(static, dyn.sequences)
    for ls, ld in zip(c1.layers, dyn.past_key_values.layers):
        assert torch.equal(ls.seq_lens, ld.seq_lens)
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
    store.append([tuple(x.to(layer.model_dtype) for x in _by_position(layer)[:2]) for layer in layers])


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("chunk", [16, 13])
def test_chunk_attends_dequantized_past_and_itself_exactly(kind, chunk):
    model = tiny_model(layers=2)
    dense = copy.deepcopy(model)
    ids = prompt(64, batch=2)
    pasts = []
    with kvsparse.patched(model, method="qaq", cache_dtype="float32", **ADAPT):
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
