"""KVSparseCache.load_sequence: prefill sequence by sequence into a batch cache
(tiny random Llama, CPU, fp32), for every registered method.

Each prompt but its last token is prefilled into its own batch-1 cache by the
patched model; the caches are loaded into the rows of a batch cache; then
``generate()`` runs on the left-padded batch of the whole prompts: the cache
holds all but the last column, so generate feeds the last token of every
sequence (at its own position, from the attention mask) and decodes. The
tokens must be those of decoding each sequence alone from its own cache.
"""
import pytest
import torch

pytest.importorskip("transformers")

import kvsparse  # noqa: E402
from kvsparse import _compat, hf, methods  # noqa: E402
from kvsparse.cache import KVSparseCache  # noqa: E402

from test_hf_patch import PAD, greedy, left_pad, prompt, tiny_model  # noqa: E402

HEAD_DIM = 32  # tiny_model's
MAX_LEN = 64
LENGTHS = (37, 22, 4)  # prompt lengths (different: the batch is left-padded; 3 < QAQ's window)
NEW = 8  # decoded tokens (QAQ's default re-quantizes every 5 steps)

#: configs under which the built-in methods run their sparse path at these
#: lengths (not the short dense fallback); other methods: their defaults
SPARSE = {
    "quest": dict(token_budget=16, page_size=8, dense_layers=0, dense_below=0),
    "sparq": dict(r=8, k=8, dense_below=0),
    # widths 2 / 4 / 8 at these lengths (the default sigma leaves every token at 2 bits here)
    "qaq": dict(sigma_k=3e-4, sigma_v=3e-3, window=8, requant_every=3),
    "quest_qaq": dict(token_budget=16, page_size=8, dense_layers=0, sigma_k=3e-4, sigma_v=3e-3, window=8,
                      requant_every=3),
}


@pytest.fixture(params=methods.names())
def method(request):
    return methods.get(request.param)


def _config(method, kind):
    if kind == "lossless":
        return method.lossless_kwargs(HEAD_DIM, MAX_LEN)
    return SPARSE.get(method.name, {})


def _prefill(model, ids, max_cache_len=MAX_LEN):
    """A batch-1 cache of the patched model holding ``ids`` (one sequence)."""
    cache = kvsparse.make_cache(model, batch_size=1, max_cache_len=max_cache_len)
    with torch.no_grad():
        model(ids[None], use_cache=True, logits_to_keep=1, **_compat.model_cache_kwargs(model, cache))
    return cache


def _rows(cache, b):
    """Sequence ``b``'s state in each kvsparse layer: its length and the
    ``b`` rows of its parts' per-sequence tensors (QAQ: its stores' widths)."""
    out = []
    for _, layer in cache.kvsparse_layers():
        out.append(layer.seq_lens[b])
        for part in layer._parts():
            out.extend(getattr(part, name)[b] for name in part.names)
            for store in (getattr(part, "ks", None), getattr(part, "vs", None)):
                if store is not None:
                    out.append(store.widths[b])
    return out


def _generate(model, ids, cache, **kw):
    return greedy(model, ids, n=NEW, **kvsparse.cache_kwargs(model, cache), disable_compile=True, output_scores=True,
                  return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("kind", ["sparse", "lossless"])
def test_batch_of_loaded_sequences_decodes_as_each_alone(method, kind, static):
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=40 + n)[0] for n in LENGTHS]
    cap = MAX_LEN if static else None
    # dynamic: small chunks, so that the caches' capacities differ (the batch grows as it loads)
    extra = {} if static else {"chunk_size": 8}
    with hf.patched(model, method=method.name, **_config(method, kind), **extra):
        singles = [_prefill(model, s[:-1], cap) for s in seqs]
        batch = kvsparse.make_cache(model, batch_size=len(seqs), max_cache_len=cap)
        ptrs = [t.data_ptr() for _, layer in batch.kvsparse_layers() for t in layer.state_tensors()]
        # a row loaded twice keeps only the last copy (dynamic: the shortest first, so the batch
        # grows at the next load, QAQ's packed arena included)
        batch.load_sequence(0, singles[-1])
        for b, single in enumerate(singles):
            batch.load_sequence(b, single)
        if static:  # in place: a compiled decode step stays valid
            assert ptrs == [t.data_ptr() for _, layer in batch.kvsparse_layers() for t in layer.state_tensors()]
        for _, layer in batch.kvsparse_layers():
            assert layer.seq_lens.tolist() == [n - 1 for n in LENGTHS]
        assert int(batch.get_seq_length()) == max(LENGTHS) - 1

        ids, mask = left_pad(seqs)
        out = _generate(model, ids, batch, attention_mask=mask)
        for b, (s, single) in enumerate(zip(seqs, singles)):
            alone = _generate(model, s[None], single)
            assert torch.equal(out.sequences[b, ids.shape[1]:], alone.sequences[0, s.shape[0]:]), b
            for got, ref in zip(out.scores, alone.scores):
                torch.testing.assert_close(got[b], ref[0], atol=1e-4, rtol=1e-4)
            for got, ref in zip(_rows(batch, b), _rows(single, 0)):
                common = tuple(slice(0, min(n, m)) for n, m in zip(got.shape, ref.shape))  # dynamic capacities
                # (float state such as attention weights: the batched forward rounds like the scores)
                torch.testing.assert_close(got[common], ref[common], atol=1e-4, rtol=1e-3)
        for _, layer in batch.kvsparse_layers():
            assert layer.seq_lens.tolist() == [n - 1 + NEW for n in LENGTHS]


def test_generate_continues_a_prefilled_cache_with_one_token(method):
    """generate() over S tokens with a cache holding S - 1 runs the last token
    only: a decode step, never a prefill."""
    model = tiny_model(layers=2)
    ids = prompt(30, seed=3)[0]
    with hf.patched(model, method=method.name, **_config(method, "lossless")):
        cache = _prefill(model, ids[:-1])
        seen = []
        hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[-1]))
        try:
            _generate(model, ids[None], cache)
        finally:
            hook.remove()
    assert seen == [1] * NEW


# ------------------------------------------------------------------ bad input
@pytest.fixture
def setup():
    model = tiny_model(layers=2)
    with hf.patched(model, method="quest", **_config(methods.get("quest"), "lossless")):
        single = _prefill(model, prompt(20)[0])
        batch = kvsparse.make_cache(model, batch_size=2, max_cache_len=MAX_LEN)
        yield model, single, batch


def _unchanged(batch):
    return [t.clone() for _, layer in batch.kvsparse_layers() for t in layer.state_tensors()]


def test_bad_row_and_type(setup):
    model, single, batch = setup
    before = _unchanged(batch)
    for b in (2, -1):
        with pytest.raises(ValueError, match=r"b must be in \[0, 2\)"):
            batch.load_sequence(b, single)
    for b in (True, 0.0, "0"):
        with pytest.raises(TypeError, match="b must be an int"):
            batch.load_sequence(b, single)
    with pytest.raises(TypeError, match="other must be a kvsparse cache"):
        batch.load_sequence(0, object())
    after = _unchanged(batch)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_bad_other(setup):
    model, single, batch = setup
    with pytest.raises(ValueError, match="batch size 1"):
        batch.load_sequence(0, batch)
    with pytest.raises(ValueError, match="max_cache_len"):
        batch.load_sequence(0, _prefill(model, prompt(20)[0], max_cache_len=MAX_LEN + 8))
    with pytest.raises(ValueError, match="static cache"):
        batch.load_sequence(0, _prefill(model, prompt(20)[0], max_cache_len=None))
    with pytest.raises(ValueError, match="not initialised"):
        batch.load_sequence(0, kvsparse.make_cache(model, max_cache_len=MAX_LEN))
    with pytest.raises(ValueError, match="this cache is not initialised"):
        kvsparse.make_cache(model, max_cache_len=MAX_LEN).load_sequence(0, single)
    with pytest.raises(ValueError, match="layers"):
        batch.load_sequence(0, KVSparseCache(num_layers=3, config=model.kvsparse_config,
                                                      max_cache_len=MAX_LEN))
    other_cfg = model.kvsparse_config.replace(token_budget=2 * model.kvsparse_config.token_budget)
    bad = kvsparse.make_cache(model, batch_size=1, max_cache_len=MAX_LEN, config=other_cfg)
    with pytest.raises(ValueError, match="config differs in token_budget"):
        batch.load_sequence(0, bad)
    with pytest.raises(TypeError, match="dtype"):
        batch.load_sequence(0, kvsparse.make_cache(model, batch_size=1, max_cache_len=MAX_LEN, dtype=torch.float16))
    qaq = kvsparse.make_cache(model, batch_size=1, max_cache_len=MAX_LEN, config=kvsparse.make_config("qaq"))
    with pytest.raises(ValueError, match="'qaq' cache"):
        batch.load_sequence(0, qaq)


def test_pending_prefill_raises(setup):
    model, single, batch = setup
    k = torch.zeros(1, 2, 4, HEAD_DIM)
    single.layers[1].update(k, k)  # a multi-token update nobody committed
    with pytest.raises(ValueError, match="never committed"):
        batch.load_sequence(0, single)
    assert batch.layers[0].seq_lens.tolist() == [0, 0]  # checked before anything is copied


def test_native_layers_raise():
    model = tiny_model(layers=2)
    with hf.patched(model, method="quest", **_config(methods.get("quest"), "lossless")):
        cfg = model.kvsparse_config
        batch = KVSparseCache(config=cfg, max_cache_len=MAX_LEN, model_config=model.config,
                                       native_layers=[1])
        single = KVSparseCache(config=cfg, max_cache_len=MAX_LEN, model_config=model.config,
                                        native_layers=[1])
        with pytest.raises(NotImplementedError, match=r"layers \[1\].*native_layers"):
            batch.load_sequence(0, single)


def test_qaq_window_follows_the_batch_ring():
    """QAQ's importance window is one ring for the batch (``window.step`` is
    shared): a loaded sequence's history is rotated so that every later step
    overwrites the same (oldest) entry as in its own cache."""
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=n)[0] for n in (4, 30, 6)]  # 3, 29, 5 prefill rows of a 5-step window
    with hf.patched(model, method="qaq", sigma=0.01, window=5):
        singles = [_prefill(model, s[:-1]) for s in seqs]
        batch = kvsparse.make_cache(model, batch_size=4, max_cache_len=MAX_LEN)
        g = torch.Generator().manual_seed(0)
        for i in range(3):  # the batch's ring moves on between the loads
            for b, single in enumerate(singles):
                batch.load_sequence(b, single)
            for _, layer in batch.kvsparse_layers():
                win = layer.storage.window
                alone = [single.layers[layer.layer_idx].storage.window for single in singles]
                refs = [(w.hist[:, 0].clone(), int(w.step)) for w in alone]
                for step in range(7):
                    p = torch.rand(4, *win.hist.shape[2:], generator=g)
                    win.push(p)
                    for b, (hist, at) in enumerate(refs):  # the push into the sequence's own window
                        hist[(at + step) % hist.shape[0]] = p[b]
                        # the max over the ring is what the widths read
                        assert torch.equal(win.hist[:, b].amax(0), hist.amax(0)), (i, step, b)
