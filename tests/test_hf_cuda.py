"""kvsparse.patch on CUDA (tiny random Llama with head_dim 64; 80, 96 and 256
in test_cuda_head_dims_lossless_equals_unpatched): run on the GPU machine."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvsparse  # noqa: E402
from kvsparse import hf  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and kvsparse.has_cuda()),
                       reason="needs a CUDA device and kvsparse built with CUDA"),
]

VOCAB, PAD = 128, 0


def tiny_llama(dtype=torch.float32, layers=3, head_dim=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                      max_position_embeddings=2048, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def ids_of(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g).cuda()


def greedy(model, ids, n=12, **kw):
    kw.setdefault("attention_mask", torch.ones_like(ids))
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD, **kw)


def test_cuda_full_budget_equals_unpatched_fp32():
    model = tiny_llama()
    ids = ids_of(300)
    ref = greedy(model, ids, n=16, disable_compile=True)
    with hf.patched(model, token_budget=4096, page_size=16, dense_layers=1):
        out = greedy(model, ids, n=16, disable_compile=True)
    assert torch.equal(out, ref)


def test_cuda_left_padding_small_budget_batched_equals_single():
    model = tiny_llama()
    seqs = [ids_of(n, seed=n)[0] for n in (210, 77, 300)]
    L = max(len(s) for s in seqs)
    ids = torch.full((3, L), PAD, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = s
        mask[i, L - len(s):] = 1
    with hf.patched(model, token_budget=64, page_size=16, dense_layers=1):
        out = greedy(model, ids, n=10, attention_mask=mask, disable_compile=True)
        for i, s in enumerate(seqs):
            single = greedy(model, s[None], n=10, disable_compile=True)
            assert torch.equal(out[i, L:], single[0, len(s):]), i


def test_cuda_fp16_small_budget_finite():
    model = tiny_llama(torch.float16)
    with hf.patched(model, token_budget=64, page_size=16):
        out = greedy(model, ids_of(500), n=8, disable_compile=True, output_scores=True,
                     return_dict_in_generate=True)
    assert all(torch.isfinite(s).all() for s in out.scores)


@pytest.mark.parametrize("method,kw", [
    ("quest", dict(token_budget=32, page_size=16, dense_layers=1)),
    # re-quantization every 2 steps on the static layer's device schedule (CUDA graphs)
    ("qaq", dict(sigma=0.05, requant_every=2, window=3, n_recent=2)),
    # Quest over QAQ: page selection + packed sparse attention + the device re-quantization schedule
    ("quest_qaq", dict(token_budget=32, page_size=16, dense_layers=1, sigma=0.05, requant_every=2, window=3,
                       n_recent=2)),
    ("quest_qaq", dict(token_budget=32, page_size=16, dense_layers=1, uniform_bits=4)),
])
def test_cuda_static_compiled_equals_eager(method, kw):
    """transformers' compiled decode path (static cache, torch.compile,
    CUDA graphs) with the patch."""
    torch._dynamo.reset()
    model = tiny_llama(layers=2)
    ids = ids_of(100, batch=2)
    with hf.patched(model, method=method, **kw):
        eager = greedy(model, ids, n=8, disable_compile=True,
                       **kvsparse.cache_kwargs(model, hf.make_cache(model, batch_size=2, max_cache_len=128)))
        compiled = greedy(model, ids, n=8,
                          **kvsparse.cache_kwargs(model, hf.make_cache(model, batch_size=2, max_cache_len=128)))
    assert torch.equal(compiled, eager)


def _steps_without_sync(model, cache, ids, n=12):
    """Prefill, two warm-up decode steps, then ``n`` steps under torch's sync debug mode."""
    with torch.no_grad():
        model(ids, **kvsparse.cache_kwargs(model, cache))
        nxt = ids[:, -1:]
        for _ in range(2):  # warm-up (lazy allocations)
            model(nxt, **kvsparse.cache_kwargs(model, cache))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(n):
                out = model(nxt, **kvsparse.cache_kwargs(model, cache))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out


@pytest.mark.parametrize("method,kw", [("qaq", {}), ("qaq", {"uniform_bits": 4}),
                                       ("qaq", {"max_cache_len": 512, "requant_every": 2}),  # static layer
                                       ("quest", {"token_budget": 64, "dense_below": 0}),
                                       ("quest", {"token_budget": 64, "dense_below": 0, "mode": "softmax"}),
                                       ("sparq", {"compression": 0.25, "dense_below": 0}),
                                       ("quest_qaq", {"token_budget": 64, "dense_layers": 1}),
                                       ("quest_qaq", {"token_budget": 64, "max_cache_len": 512,
                                                      "requant_every": 2})])
def test_cuda_decode_steps_never_sync(method, kw):
    """Decode steps (re-quantization included, compaction not yet due) make no
    host synchronisation: torch's sync debug mode raises on any."""
    from transformers import DynamicCache

    model = tiny_llama(dtype=torch.bfloat16, layers=2)
    ids = ids_of(300)
    try:  # the control: transformers' own dense step
        _steps_without_sync(model, DynamicCache(config=model.config), ids, n=3)
    except RuntimeError as e:
        pytest.skip(f"transformers' own decode step synchronises: {e}")
    with hf.patched(model, method=method, **kw):
        out = _steps_without_sync(model, hf.make_cache(model, 1), ids)
    assert torch.isfinite(out.logits.float()).all()


@torch.no_grad()
def _stepwise_logits(model, ids, cont, cache):
    """Prefill ``ids``, then teacher-force ``cont`` one token at a time: the
    logits of every step (the prefill's last position first)."""
    out = model(ids, **kvsparse.cache_kwargs(model, cache), use_cache=True)
    logits = [out.logits[:, -1].float()]
    for i in range(cont.shape[1]):
        pos = torch.full((ids.shape[0], 1), ids.shape[1] + i, dtype=torch.long, device=ids.device)
        out = model(cont[:, i:i + 1], **kvsparse.cache_kwargs(model, out.past_key_values), position_ids=pos, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


@pytest.mark.parametrize("head_dim", [80, 96, 256])
@pytest.mark.parametrize("method", ["quest", "sparq", "qaq", "quest_qaq"])
def test_cuda_head_dims_lossless_equals_unpatched(method, head_dim):
    """The head dims beyond 64 / 128 through the patched model on CUDA: under
    the method's lossless settings the decode logits are the unpatched
    model's (fp32, teacher-forced); a method whose CUDA kernels lack the head
    dim (QAQ: 80) raises at patch time, and with fallback="dense" runs dense,
    with a warning."""
    from kvsparse import _compat, methods

    m = methods.get(method)
    model = tiny_llama(layers=2, head_dim=head_dim)
    L, n = 90, 6
    ids, cont = ids_of(L), ids_of(n, seed=2)
    with torch.no_grad():
        full = model(torch.cat([ids, cont], 1)).logits[:, L - 1:].float()  # unpatched, dense
    kw = m.lossless_kwargs(head_dim, L + n)
    if head_dim not in hf.cuda_head_dims(method):
        with pytest.raises(_compat.IntegrationError, match=f"head_dim {head_dim} on cuda"):
            hf.patch(model, method=method, **kw)
        assert not hf.is_patched(model)
        with pytest.warns(UserWarning, match=f"no CUDA kernel for head_dim {head_dim}"):
            hf.patch(model, method=method, fallback="dense", **kw)
        try:
            with pytest.warns(UserWarning, match=f"no CUDA kernel for head_dim {head_dim}"):
                cache = hf.make_cache(model)
            got = _stepwise_logits(model, ids, cont, cache)
        finally:
            hf.unpatch(model)
        assert cache.native_layers == {0, 1}
        torch.testing.assert_close(got, full[:, : n + 1], atol=1e-4, rtol=1e-4)
        return
    with hf.patched(model, method=method, **kw):
        cache = hf.make_cache(model)
        got = _stepwise_logits(model, ids, cont, cache)
    assert not cache.native_layers
    atol, rtol = m.lossless_tolerance
    torch.testing.assert_close(got, full[:, : n + 1], atol=atol, rtol=rtol)
