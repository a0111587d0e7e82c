"""Chunked prefill (``generate(..., prefill_chunk_size=N)``, or several
multi-token forwards) with every method, static and dynamic caches (tiny
random Llama, CPU).

* Quest, SparQ (dense K/V buffers): chunked == unchunked (logits of every
  prompt position, generated tokens and their logits; transformers 4.x's
  generate runs the last prompt token as a decode step, so there chunked
  generate is compared with a one-chunk one).
* QAQ, Quest over QAQ (packed cache, no fp16 K/V): a chunk attends to the
  dequantized earlier chunks and to itself exactly; checked against a plain
  torch reference (the unpatched model over a ``DynamicCache`` holding the
  dequantized past). Tokens may differ from unchunked.
* memory: a chunk attending to a packed cache holds one layer's dequantized
  past at a time, and nothing of it after the forward.
"""
import copy
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, GenerationConfig, GenerationMixin  # noqa: E402

import kvsparse  # noqa: E402
from kvsparse import qaq  # noqa: E402

from test_hf_patch import PAD, prompt, tiny_model  # noqa: E402

if not hasattr(GenerationConfig(), "prefill_chunk_size"):  # pragma: no cover - every supported version has it
    pytest.skip(f"transformers {transformers.__version__} has no generate(prefill_chunk_size=...)",
                allow_module_level=True)

PAGE = 8
PROMPT = 64
STATIC_LEN = 96
#: 16 divides the prompt (a page multiple), 24 does not divide it (a page
#: multiple), 13 neither divides it nor is a page multiple
CHUNKS = (16, 24, 13)
#: transformers 4.x (``GenerationMixin._prefill_chunking``) prefills all but
#: the last prompt token in chunks; the last one is the first decode step (the
#: method's decode attention, not dense). 5.x prefills every prompt token.
LAST_PROMPT_TOKEN_DECODED = hasattr(GenerationMixin, "_prefill_chunking")
#: the chunk size generate(prefill_chunk_size=...) runs with
GEN_CHUNK = 13
NEW = 8

#: small budgets, so that decoding reads a selection of the cache
EXACT = {
    "quest": dict(token_budget=16, page_size=PAGE, dense_layers=0, dense_below=0),
    "sparq": dict(r=8, k=16, dense_below=0),
}
#: float32 codes' scales (cache_dtype) so that "exact" is the model's float32;
#: sigma low enough that many past tokens drop to 2 or 4 bits
QUANTIZED = {
    "qaq": dict(sigma=0.05, requant_every=2, window=3, n_recent=2, cache_dtype="float32"),
    "quest_qaq": dict(sigma=0.05, requant_every=2, window=3, n_recent=2, cache_dtype="float32",
                      token_budget=16, page_size=PAGE, dense_layers=0),
}
CACHES = ["dynamic", "static"]


def test_every_method_is_covered():
    assert set(kvsparse.methods.names()) == set(EXACT) | set(QUANTIZED)


def _cache(model, kind):
    return kvsparse.make_cache(model, max_cache_len=STATIC_LEN if kind == "static" else None)


def _forward(model, ids, cache, start):
    n = ids.shape[1]
    pos = torch.arange(start, start + n).expand(ids.shape[0], n)
    with torch.no_grad():
        return model(ids, **kvsparse.cache_kwargs(model, cache), position_ids=pos, use_cache=True).logits


def _chunked(model, ids, cache, size, before=None):
    """Logits of every position, prefilled ``size`` tokens at a time;
    ``before(cache)`` runs before each chunk."""
    out = []
    for s in range(0, ids.shape[1], size):
        if before is not None:
            before(cache)
        out.append(_forward(model, ids[:, s:s + size], cache, s))
    return torch.cat(out, 1)


def _generate_first_logits(model, ids, cache, chunk):
    """What generate(prefill_chunk_size=chunk) computes for the first new token, by hand."""
    if LAST_PROMPT_TOKEN_DECODED:
        _chunked(model, ids[:, :-1], cache, chunk)
        return _forward(model, ids[:, -1:], cache, ids.shape[1] - 1)[:, -1]
    return _chunked(model, ids, cache, chunk)[:, -1]


def _generate(model, ids, cache, chunk=None):
    kw = {} if chunk is None else dict(prefill_chunk_size=chunk)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          pad_token_id=PAD, return_dict_in_generate=True, output_logits=True,
                          **kvsparse.cache_kwargs(model, cache), **kw)


# ------------------------------------------------------- Quest, SparQ: exact
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kind", CACHES)
@pytest.mark.parametrize("method", list(EXACT))
def test_chunked_equals_unchunked(method, kind, chunk):
    model = tiny_model(layers=2)
    ids = prompt(PROMPT, batch=2)
    with kvsparse.patched(model, method=method, **EXACT[method]):
        whole = _forward(model, ids, _cache(model, kind), 0)
        parts = _chunked(model, ids, _cache(model, kind), chunk)
        torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
        if chunk != GEN_CHUNK:
            return
        # 5.x: == unchunked; 4.x: == one chunk (with the last prompt token decoded, both)
        ref = _generate(model, ids, _cache(model, kind), PROMPT if LAST_PROMPT_TOKEN_DECODED else None)
        out = _generate(model, ids, _cache(model, kind), chunk)
        first = _generate_first_logits(model, ids, _cache(model, kind), chunk)
    torch.testing.assert_close(out.logits[0], first, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-5, rtol=1e-5)
    assert out.past_key_values.layers[0].seq_lens.tolist() == [PROMPT + NEW - 1] * 2


# ----------------------------------------------- QAQ, Quest over QAQ: reference
def _dequantized_past(cache, store):
    """Before a chunk: each layer's stored ``(keys, values)`` dequantized with
    kvsparse's op (``None`` before the first chunk)."""
    layers = cache.layers
    if not layers[0].is_initialized or layers[0].tokens_seen() == 0:
        store.append(None)
        return
    past = []
    for layer in layers:
        T = int(layer.seq_lens.max())
        assert layer.seq_lens.tolist() == [T] * layer.batch_size  # no padding: one length
        past.append(tuple(qaq.dequantize(st, layer.seq_lens)[:, :, :T].to(layer.model_dtype)
                          for st in (layer.ks, layer.vs)))
    store.append(past)


def _reference(dense, ids, size, pasts):
    """Each chunk through the unpatched model over a DynamicCache holding the
    dequantized past: SDPA over [dequantized past, the chunk's exact K/V],
    causal within the chunk."""
    out = []
    for j, s in enumerate(range(0, ids.shape[1], size)):
        cache = DynamicCache(config=dense.config)
        for i, (k, v) in enumerate(pasts[j] or ()):
            cache.update(k, v, i)
        out.append(_forward(dense, ids[:, s:s + size], cache, s))
    return torch.cat(out, 1)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kind", CACHES)
@pytest.mark.parametrize("method", list(QUANTIZED))
def test_chunk_attends_dequantized_past_and_itself_exactly(method, kind, chunk):
    model = tiny_model(layers=2)
    dense = copy.deepcopy(model)
    ids = prompt(PROMPT, batch=2)
    pasts = []
    with kvsparse.patched(model, method=method, **QUANTIZED[method]):
        got = _chunked(model, ids, _cache(model, kind), chunk, before=lambda c: _dequantized_past(c, pasts))
        if chunk == GEN_CHUNK:
            gen = _generate(model, ids, _cache(model, kind), chunk)
            first = _generate_first_logits(model, ids, _cache(model, kind), chunk)
    ref = _reference(dense, ids, chunk, pasts)
    # attending to its own quantized K/V (8 bits) is off by ~1e-3, to the
    # exact past by ~1e-1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    exact = _forward(dense, ids, DynamicCache(config=dense.config), 0)
    torch.testing.assert_close(got[:, :chunk], exact[:, :chunk], atol=1e-5, rtol=1e-5)  # the first chunk is dense
    assert (got[:, chunk:] - exact[:, chunk:]).abs().max() > 1e-2  # the past really is quantized
    if chunk == GEN_CHUNK:  # generate's chunked prefill is this path (5.x: its first logits are got[:, -1])
        if not LAST_PROMPT_TOKEN_DECODED:
            torch.testing.assert_close(first, got[:, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gen.logits[0], first, atol=1e-5, rtol=1e-5)
        assert gen.sequences.shape == (2, PROMPT + NEW)


# ------------------------------------------------------------------- memory
@pytest.mark.parametrize("kind", CACHES)
@pytest.mark.parametrize("method", list(QUANTIZED))
def test_chunk_holds_one_layer_of_dequantized_past(method, kind, monkeypatch):
    """A chunk's forward over a packed cache: every dequantized past it makes
    (kvsparse.qaq.dequantize's outputs, the method's continuation_kv) is one
    layer's (at most its capacity); at most two of them (one layer's keys and
    values) are alive when another is made, none after the forward, and no
    layer keeps the chunk's exact K/V."""
    layers = 4
    model = tiny_model(layers=layers)
    ids = prompt(PROMPT, batch=2)
    made, alive_at_call = [], []

    def track(*outs):
        for t in outs:
            assert t.shape[0] == 2 and t.shape[2] <= cache.layers[0].capacity
            made.append(weakref.ref(t))

    def calls(fn):
        def wrapped(*args):
            alive_at_call.append(sum(r() is not None for r in made))
            out = fn(*args)
            track(*(out if isinstance(out, tuple) else (out,)))
            return out
        return wrapped

    with kvsparse.patched(model, method=method, **QUANTIZED[method]):
        cache = _cache(model, kind)
        _forward(model, ids[:, :32], cache, 0)
        m = kvsparse.methods.get(method)
        monkeypatch.setattr(qaq, "dequantize", calls(qaq.dequantize))
        monkeypatch.setattr(m, "continuation_kv", calls(m.continuation_kv))
        for s in (32, 48):
            made.clear()
            alive_at_call.clear()
            _forward(model, ids[:, s:s + 16], cache, s)
            assert len(alive_at_call) >= 3 * layers  # each layer dequantized its past
            assert max(alive_at_call) <= 2, alive_at_call
            assert all(r() is None for r in made)
            assert all(layer.storage._fresh is None for layer in cache.layers)


def test_unpadded_chunks_take_the_lower_right_causal_path(monkeypatch):
    """Chunks that continue every sequence at one length (no padding) attend
    through one SDPA call with a lower-right causal bias: no [chunk, past]
    mask and no K/V expanded across the group (transients that grow with the
    context), with the logits of the unchunked prefill."""
    import torch.nn.attention.bias as bias

    calls = []
    orig = bias.causal_lower_right
    monkeypatch.setattr(bias, "causal_lower_right", lambda *a: calls.append(a) or orig(*a))
    model = tiny_model(layers=2)
    ids = prompt(48, batch=1)
    with kvsparse.patched(model, **{"method": "quest", **EXACT["quest"]}):
        fast = _chunked(model, ids, _cache(model, "dynamic"), 16)
    assert calls and all(a[0] == 16 for a in calls)
    with kvsparse.patched(model, **{"method": "quest", **EXACT["quest"]}):
        whole = _forward(model, ids, _cache(model, "dynamic"), 0)
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(set(EXACT) | set(QUANTIZED)))
def test_unpadded_static_chunks_get_no_cache_sized_mask(method, monkeypatch):
    """A static cache would size transformers' causal mask [chunk, max_cache_len]
    (bools that grow with the context: 8 GiB for an 8k-token chunk of a 1M-token
    cache). Without padding no kvsparse layer reads it, so the patched SDPA mask
    is None for every chunk, and the logits are those of the unchunked prefill;
    with padding the mask is still built."""
    from kvsparse import hf

    masks = []
    orig = hf._valid_from_mask
    monkeypatch.setattr(hf, "_valid_from_mask", lambda mask, *a: masks.append(mask) or orig(mask, *a))
    kw = {**EXACT, **QUANTIZED}[method]
    model = tiny_model(layers=2)
    ids = prompt(48, batch=1)
    with kvsparse.patched(model, **{"method": method, **kw}):
        fast = _chunked(model, ids, _cache(model, "static"), 16)
        assert len(masks) >= 2 * 3 and all(m is None for m in masks), [getattr(m, "shape", m) for m in masks]
        masks.clear()
        padded = torch.ones(2, 16, dtype=torch.long)
        padded[0, :3] = 0
        with torch.no_grad():
            model(prompt(16, batch=2), attention_mask=padded, use_cache=True,
                  **kvsparse.cache_kwargs(model, kvsparse.make_cache(model, max_cache_len=STATIC_LEN)))
        assert masks and all(torch.is_tensor(m) for m in masks)
    if method in EXACT:
        with kvsparse.patched(model, **{"method": method, **kw}):
            whole = _forward(model, ids, _cache(model, "static"), 0)
        torch.testing.assert_close(fast, whole, atol=1e-5, rtol=1e-5)
