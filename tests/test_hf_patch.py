"""kvsparse.patch on Hugging Face LLaMA-family models (tiny random models, CPU)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    CompileConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import kvsparse  # noqa: E402,F401
from kvsparse import hf  # noqa: E402
from kvsparse.cache import QuestCache, QuestDynamicLayer, QuestStaticLayer  # noqa: E402
from kvsparse.config import QuestConfig, make_config  # noqa: E402

VOCAB = 128
PAD = 0

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(arch="llama", layers=3, dtype=torch.float32, seed=0, **extra):
    """A tiny random model of ``arch`` (a key of ``ARCHS`` or a
    ``(config class, model class)`` pair); ``extra`` overrides the config."""
    cfg_cls, model_cls = ARCHS[arch] if isinstance(arch, str) else arch
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(extra)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).to(dtype).eval().requires_grad_(False)  # kvsparse has no backward
    # a random model rarely hits EOS, but never let it stop early
    model.generation_config.eos_token_id = None
    return model


def prompt(length, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_pad(seqs, pad_id=PAD):
    L = max(s.shape[-1] for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - s.shape[-1]:] = s
        mask[i, L - s.shape[-1]:] = 1
    return ids, mask


def greedy(model, ids, n=12, **kw):
    kw.setdefault("attention_mask", torch.ones_like(ids))
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD, **kw)


def stepwise_logits(model, ids, cont, cache):
    """Prefill ``ids`` then teacher-force the tokens ``cont`` one at a time;
    returns the logits of every step (prefill's last position first)."""
    out = model(ids, **kvsparse.cache_kwargs(model, cache), use_cache=True)
    logits = [out.logits[:, -1].float()]
    cache = out.past_key_values
    L = ids.shape[1]
    for i in range(cont.shape[1]):
        pos = torch.full((ids.shape[0], 1), L + i, dtype=torch.long)
        out = model(cont[:, i:i + 1], **kvsparse.cache_kwargs(model, cache), position_ids=pos, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


# ---------------------------------------------------------------- config
def test_config_defaults_repr_and_dict():
    c = QuestConfig()
    assert (c.token_budget, c.page_size, c.dense_layers, c.mode, c.max_cache_len, c.chunk_size) == (
        1024, 16, 2, "softmax", None, 256)
    assert "token_budget=1024" in repr(c) and repr(c).startswith("QuestConfig(")
    d = c.to_dict()
    assert d["method"] == "quest" and d["page_size"] == 16
    assert make_config("quest", token_budget=64, page_size=8) == QuestConfig(token_budget=64, page_size=8)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(token_budget=8, page_size=16), "token_budget"),
        (dict(page_size=0), "page_size"),
        (dict(mode="token"), "mode"),
        (dict(dense_layers=-1), "dense_layers"),
        (dict(max_cache_len=0), "max_cache_len"),
        (dict(chunk_size=100), "chunk_size"),
        (dict(token_budget=1.5), "token_budget"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuestConfig(**kwargs)
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match=field):
        hf.patch(model, method="quest", **kwargs)
    assert not hf.is_patched(model)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="quest"):
        make_config("magic")
    with pytest.raises(ValueError, match="budget"):
        make_config("quest", budget=3)


def test_unsupported_model_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(TypeError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        hf.patch(model)
    with pytest.raises(TypeError, match="supported"):
        hf.patch(torch.nn.Linear(2, 2))


# -------------------------------------------------------- exact equality
@pytest.mark.parametrize("arch", list(ARCHS))
def test_full_budget_greedy_equals_unpatched(arch):
    model = tiny_model(arch)
    ids = prompt(37)
    ref = greedy(model, ids, n=16)
    hf.patch(model, token_budget=1024, page_size=16, dense_layers=1)
    assert model.config._attn_implementation == "kvsparse"
    assert isinstance(model.kvsparse_config, QuestConfig)
    out = greedy(model, ids, n=16, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, QuestCache)
    layer = out.past_key_values.layers[-1]
    assert isinstance(layer, QuestDynamicLayer)
    assert layer.seq_lens.tolist() == [37 + 16 - 1]
    assert torch.equal(out.sequences, ref)
    hf.unpatch(model)


@pytest.mark.parametrize("mode", ["group", "head", "max", "softmax", "union"])
def test_full_budget_matches_dense_stepwise(mode):
    model = tiny_model(layers=2)
    ids, cont = prompt(45, batch=2), prompt(6, batch=2, seed=5)
    ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, token_budget=64, page_size=8, dense_layers=0, mode=mode):
        got = stepwise_logits(model, ids, cont, hf.make_cache(model))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_dense(dtype):
    model = tiny_model(layers=2, dtype=dtype)
    ids, cont = prompt(30), prompt(5, seed=3)
    ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, token_budget=1024):
        got = stepwise_logits(model, ids, cont, hf.make_cache(model))
        out = greedy(model, ids, n=6)
    assert torch.isfinite(got).all()
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    assert out.shape == (1, 36)


# ------------------------------------------------------------ left padding
def test_left_padding_batched_equals_single():
    model = tiny_model(layers=3)
    seqs = [prompt(n, seed=10 + n)[0] for n in (21, 40, 9)]
    ids, mask = left_pad(seqs)
    n = 10
    with hf.patched(model, token_budget=1024, page_size=16):
        out = greedy(model, ids, n=n, attention_mask=mask, return_dict_in_generate=True)
        for i, s in enumerate(seqs):
            single = greedy(model, s[None], n=n)
            assert torch.equal(out.sequences[i, ids.shape[1]:], single[0, s.shape[0]:]), i
        # padding is never stored as a valid token
        for layer in out.past_key_values.layers:
            assert layer.seq_lens.tolist() == [len(s) + n - 1 for s in seqs]
        # whatever sits at the padded positions cannot change the result
        ids2 = ids.clone()
        ids2[mask == 0] = 77
        out2 = greedy(model, ids2, n=n, attention_mask=mask)
        assert torch.equal(out2[:, ids.shape[1]:], out.sequences[:, ids.shape[1]:])


def test_left_padding_small_budget_batched_equals_single():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=20 + n)[0] for n in (70, 33)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, token_budget=32, page_size=8, dense_layers=0):
        out = greedy(model, ids, n=8, attention_mask=mask)
        for i, s in enumerate(seqs):
            single = greedy(model, s[None], n=8)
            assert torch.equal(out[i, ids.shape[1]:], single[0, s.shape[0]:]), i


# ------------------------------------------------------------------ unpatch
def test_unpatch_restores_bit_identical_logits():
    model = tiny_model()
    ids = prompt(33, batch=2)
    before = model(ids).logits
    gen_before = greedy(model, ids, n=8)
    impl = model.config._attn_implementation
    attn = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    hf.patch(model, token_budget=16, dense_layers=0)
    assert all(len(m._forward_pre_hooks) == 1 for m in attn)
    greedy(model, ids, n=8)
    hf.unpatch(model)
    assert model.config._attn_implementation == impl
    assert all(len(m._forward_pre_hooks) == 0 for m in attn)
    assert "_prepare_cache_for_generation" not in model.__dict__
    assert not hasattr(model, "kvsparse_config")
    assert torch.equal(model(ids).logits, before)
    assert torch.equal(greedy(model, ids, n=8), gen_before)
    hf.unpatch(model)  # no-op


def test_patched_context_manager_and_repatch():
    model = tiny_model(layers=2)
    with hf.patched(model, token_budget=32, page_size=16) as m:
        assert m is model and model.kvsparse_config.token_budget == 32
        hf.patch(model, token_budget=64)  # re-patch replaces the config
        assert model.kvsparse_config.token_budget == 64
        assert all(len(a._forward_pre_hooks) == 1 for a in model.modules() if type(a).__name__ == "LlamaAttention")
    assert not hf.is_patched(model)
    assert model.config._attn_implementation == "sdpa"


def test_eager_model_prefill_uses_eager():
    model = tiny_model(layers=2, attn_implementation="eager")
    ids = prompt(25)
    ref = greedy(model, ids, n=8)
    with hf.patched(model, token_budget=1024):
        assert model.config._attn_implementation == "kvsparse_eager"
        assert torch.equal(greedy(model, ids, n=8), ref)
    assert model.config._attn_implementation == "eager"


# ------------------------------------------------------------------- cache
def test_cache_grows_in_chunks():
    model = tiny_model(layers=2)
    ids = prompt(40)
    with hf.patched(model, token_budget=1024, chunk_size=32, page_size=16):
        out = greedy(model, ids, n=60, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(model, ids, n=60))
    for layer in out.past_key_values.layers:
        length = int(layer.seq_lens[0])
        assert length == 40 + 60 - 1
        assert layer.capacity > length and layer.capacity % 32 == 0
        # 64 at prefill, then a chunk (32) at a time: 96, 128; no per-token reallocation
        assert layer.num_allocations == 3 and layer.capacity == 128
        assert layer.kmin.shape[2] == layer.capacity // 16
        assert layer.keys.is_contiguous()
        torch.testing.assert_close(layer.kmin, kvsparse.quest.page_metadata(layer.keys, layer.seq_lens, 16)[0])


def test_static_cache_keeps_addresses():
    model = tiny_model(layers=2)
    ids = prompt(20, batch=2)
    with hf.patched(model, token_budget=1024):
        cache = hf.make_cache(model, batch_size=2, max_cache_len=48)
        assert cache.is_compileable and isinstance(cache.layers[0], QuestStaticLayer)
        ptrs = [(l.keys.data_ptr(), l.values.data_ptr(), l.kmin.data_ptr(), l.seq_lens.data_ptr()) for l in cache.layers]
        out = greedy(model, ids, n=10, **kvsparse.cache_kwargs(model, cache), disable_compile=True)
        assert [(l.keys.data_ptr(), l.values.data_ptr(), l.kmin.data_ptr(), l.seq_lens.data_ptr())
                for l in cache.layers] == ptrs
        assert int(cache.get_seq_length()) == 29
        with pytest.raises(ValueError, match="max_cache_len"):
            greedy(model, prompt(60), n=4, **kvsparse.cache_kwargs(model, hf.make_cache(model, max_cache_len=48)))
    assert torch.equal(out, greedy(model, ids, n=10))


def test_multi_turn_continuation():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=40 + n)[0] for n in (18, 26)]
    ids, mask = left_pad(seqs)
    turn2 = prompt(7, batch=2, seed=9)
    with hf.patched(model, token_budget=1024):
        out1 = greedy(model, ids, n=5, attention_mask=mask, return_dict_in_generate=True)
        ids2 = torch.cat([out1.sequences, turn2], 1)
        mask2 = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1)
        out2 = greedy(model, ids2, n=6, attention_mask=mask2, **kvsparse.cache_kwargs(model, out1.past_key_values))
    ref = greedy(model, ids2, n=6, attention_mask=mask2)
    assert torch.equal(out2, ref)


def test_generate_static_cache_implementation():
    model = tiny_model(layers=2)
    ids = prompt(20)
    ref = greedy(model, ids, n=8)
    with hf.patched(model, token_budget=1024):
        out = greedy(model, ids, n=8, cache_implementation="static", disable_compile=True,
                     return_dict_in_generate=True)
    assert isinstance(out.past_key_values, QuestCache) and out.past_key_values.is_compileable
    assert torch.equal(out.sequences, ref)


# ---------------------------------------------------------------- compiled
def eager_and_compiled(model, ids, mask, n=10, max_cache_len=48):
    """Greedy tokens of the (patched) model on a static cache, eager and through
    transformers' compiled decode path (fullgraph, aot_eager: CPU); returns
    ``(eager, compiled, eager cache, compiled cache)``."""
    cc = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    cc._compile_all_devices = True  # transformers compiles only on accelerators by default
    c_eager = hf.make_cache(model, batch_size=ids.shape[0], max_cache_len=max_cache_len)
    eager = greedy(model, ids, n=n, attention_mask=mask, disable_compile=True, **kvsparse.cache_kwargs(model, c_eager))
    c_comp = hf.make_cache(model, batch_size=ids.shape[0], max_cache_len=max_cache_len)
    compiled = greedy(model, ids, n=n, attention_mask=mask, compile_config=cc, **kvsparse.cache_kwargs(model, c_comp))
    assert "_compiled_call" in model.__dict__  # generate took its compiled path
    return eager, compiled, c_eager, c_comp


def test_compiled_static_decode_equals_eager():
    torch._dynamo.reset()
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=60 + n)[0] for n in (30, 19)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, token_budget=16, page_size=8, dense_layers=1):
        eager, compiled, _, _ = eager_and_compiled(model, ids, mask)
        dyn = greedy(model, ids, n=10, attention_mask=mask)
    assert torch.equal(compiled, eager)
    assert torch.equal(dyn, eager)
    assert "_compiled_call" not in model.__dict__  # dropped by unpatch


# ------------------------------------------------------------- small budget
@pytest.mark.parametrize("mode", ["group", "max", "softmax", "union"])
def test_small_budget_differs_but_finite(mode):
    model = tiny_model(layers=2)
    ids, cont = prompt(160, batch=2), prompt(4, batch=2, seed=7)
    ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, token_budget=16, page_size=16, dense_layers=0, mode=mode):
        got = stepwise_logits(model, ids, cont, hf.make_cache(model))
        out = greedy(model, ids, n=8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 0], ref[:, 0])  # prefill is dense
    assert not torch.allclose(got[:, 1:], ref[:, 1:], atol=1e-3)
    assert out.shape == (2, 168) and ((out >= 0) & (out < VOCAB)).all()


def test_beam_search_and_chunked_prefill_equal_unpatched():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=80 + n)[0] for n in (30, 17)]
    ids, mask = left_pad(seqs)
    beam_kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                   do_sample=False, pad_token_id=PAD)
    ref_beam = model.generate(ids, **beam_kw)
    ref_chunk = greedy(model, ids, n=6, attention_mask=mask, prefill_chunk_size=8)
    with hf.patched(model, token_budget=1024):
        assert torch.equal(model.generate(ids, **beam_kw), ref_beam)
        out = greedy(model, ids, n=6, attention_mask=mask, prefill_chunk_size=8, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref_chunk)
    assert out.past_key_values.layers[0].seq_lens.tolist() == [30 + 5, 17 + 5]


def test_cache_from_dense_layers_and_deepcopy():
    """A QuestCache filled layer by layer from a prefilled DynamicCache
    (update + commit, as kvsparse.eval does) decodes like a prefilled one."""
    import copy

    model = tiny_model(layers=2)
    ids, nxt = prompt(40), prompt(1, seed=2)
    pos = torch.tensor([[40]])
    with hf.patched(model, token_budget=32, page_size=8, dense_layers=1):
        with torch.no_grad():
            direct = model(ids, **kvsparse.cache_kwargs(model, hf.make_cache(model))).past_key_values
            dense = model(ids, **kvsparse.cache_kwargs(model, DynamicCache(config=model.config))).past_key_values
            converted = hf.make_cache(model)
            for src, dst in zip(dense.layers, converted.layers):
                dst.update(src.keys, src.values)
                dst.commit(None)
                dst.commit(None)  # nothing pending: no-op
            twin = copy.deepcopy(direct)
            a = model(nxt, **kvsparse.cache_kwargs(model, direct), position_ids=pos).logits
            b = model(nxt, **kvsparse.cache_kwargs(model, converted), position_ids=pos).logits
            c = model(nxt, **kvsparse.cache_kwargs(model, twin), position_ids=pos).logits
    assert converted.layers[0].seq_lens.tolist() == [41]  # 40 prefilled + 1 decoded
    assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------- autograd
@pytest.mark.parametrize("method", ["quest", "sparq", "qaq"])
def test_patched_model_with_grad_prefills_exactly_and_refuses_decode(method):
    """kvsparse's kernels have no backward: a first prefill (dense attention)
    keeps the unpatched model's gradients; a decode step with grad raises."""
    model = tiny_model(layers=2)
    ids = torch.randint(3, VOCAB, (1, 12))
    model.requires_grad_(True)
    model.zero_grad()
    model(ids, use_cache=False).logits.sum().backward()
    want = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    with hf.patched(model, method=method):
        cache = hf.make_cache(model)
        out = model(ids, **kvsparse.cache_kwargs(model, cache), use_cache=True)
        out.logits.sum().backward()
        got = model.model.layers[0].self_attn.q_proj.weight.grad
        torch.testing.assert_close(got, want)
        pos = torch.full((1, 1), ids.shape[1], dtype=torch.long)
        with pytest.raises(ValueError, match="has no backward.*torch.no_grad"):
            model(ids[:, :1], **kvsparse.cache_kwargs(model, cache), position_ids=pos, use_cache=True)
        cache.reset()
        with torch.no_grad():  # the same cache works once grad is off
            model(ids, **kvsparse.cache_kwargs(model, cache), use_cache=True)
            out = model(ids[:, :1], **kvsparse.cache_kwargs(model, cache), position_ids=pos, use_cache=True)
        assert torch.isfinite(out.logits).all()
    model.requires_grad_(False)


def test_report_says_what_the_patch_does():
    model = tiny_model(layers=3)
    assert hf.report(model) is None
    with hf.patched(model, method="quest", token_budget=100, page_size=16, dense_layers=1):
        text = hf.report(model)
        assert "layers 0-2 (3 of 3)" in text and "layers 0 (dense_layers=1)" in text
        assert "token_budget 100 is read as 6 pages of 16 = 96 tokens" in text
        assert "at most 96 cached tokens runs exact dense attention" in text
    with hf.patched(model, method="sparq", compression=0.25, dense_below=0):
        assert "dense attention" not in hf.report(model).split("\n", 2)[-1]
