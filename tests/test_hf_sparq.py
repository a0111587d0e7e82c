"""kvsparse.patch(method="sparq") on Hugging Face LLaMA-family models (tiny random models, CPU)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import CompileConfig, DynamicCache  # noqa: E402

from kvsparse import hf, sparq  # noqa: E402
from kvsparse.cache import SparQCache, SparQDynamicLayer, SparQStaticLayer  # noqa: E402
from kvsparse.config import SparQConfig, make_config  # noqa: E402

from test_hf_patch import ARCHS, PAD, greedy, left_pad, prompt, stepwise_logits, tiny_model  # noqa: E402

DENSE = dict(r=32, k=100000, reallocate=False)  # every channel and position: exact attention


# ---------------------------------------------------------------- config
def test_config_defaults_and_compression():
    c = SparQConfig()
    assert c.compression == 0.125 and c.r is None and c.k is None and c.dense_layers == 0
    assert c.to_dict()["method"] == "sparq" and repr(c).startswith("SparQConfig(")
    assert c.r_k(128, 32768) == (16, 2048)  # 1/8: r = D/8, k = S/16
    assert SparQConfig(compression=0.5).r_k(64, 1000) == (32, 250)
    assert SparQConfig(r=8, k=64).r_k(64, 40) == (8, 40)  # k clamped to the length
    assert make_config("sparq", r=4, k=9) == SparQConfig(r=4, k=9)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(compression=0.0), "compression"),
        (dict(compression=1.5), "compression"),
        (dict(r=4), "r and k"),
        (dict(r=0, k=3), "r"),
        (dict(r=4, k=0), "k"),
        (dict(r=4, k=8, compression=0.5), "compression"),
        (dict(local_window=-1), "local_window"),
        (dict(mode="token"), "mode"),
        (dict(reallocate=1), "reallocate"),
        (dict(dense_layers=-1), "dense_layers"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SparQConfig(**kwargs)
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match=field):
        hf.patch(model, method="sparq", **kwargs)
    assert not hf.is_patched(model)


def test_r_larger_than_head_dim_raises():
    model = tiny_model(layers=1)  # head_dim 32
    with pytest.raises(ValueError, match="r .*head dim"):
        hf.patch(model, method="sparq", r=33, k=8)
    assert not hf.is_patched(model)


# -------------------------------------------------------- exact equality
@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_positions_greedy_equals_unpatched(arch):
    model = tiny_model(arch)
    ids = prompt(37)
    ref = greedy(model, ids, n=16)
    hf.patch(model, method="sparq", **DENSE)
    out = greedy(model, ids, n=16, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, SparQCache)
    layer = out.past_key_values.layers[-1]
    assert isinstance(layer, SparQDynamicLayer)
    assert layer.seq_lens.tolist() == [37 + 16 - 1]
    assert torch.equal(out.sequences, ref)
    hf.unpatch(model)


@pytest.mark.parametrize("mode", ["group", "head"])
def test_all_positions_match_dense_stepwise(mode):
    model = tiny_model(layers=2)
    ids, cont = prompt(45, batch=2), prompt(6, batch=2, seed=5)
    ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, method="sparq", mode=mode, **DENSE):
        got = stepwise_logits(model, ids, cont, hf.make_cache(model))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def _check_side_data(layer):
    """kt is the keys transposed and v_mean the mean of the valid values."""
    for b, n in enumerate(layer.seq_lens.tolist()):
        torch.testing.assert_close(layer.kt[b, :, :, :n], layer.keys[b, :, :n].transpose(1, 2))
        torch.testing.assert_close(layer.v_mean[b], layer.values[b, :, :n].double().mean(1).float(),
                                   atol=1e-5, rtol=1e-5)


def test_left_padding_side_data_and_batched_equals_single():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=20 + n)[0] for n in (70, 33, 12)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method="sparq", r=8, k=16, dense_below=0):
        out = greedy(model, ids, n=8, attention_mask=mask, return_dict_in_generate=True)
        for layer in out.past_key_values.layers:
            assert layer.seq_lens.tolist() == [len(s) + 7 for s in seqs]
            _check_side_data(layer)
        for i, s in enumerate(seqs):
            single = greedy(model, s[None], n=8)
            assert torch.equal(out.sequences[i, ids.shape[1]:], single[0, s.shape[0]:]), i


def test_multi_turn_continuation_side_data():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=40 + n)[0] for n in (18, 26)]
    ids, mask = left_pad(seqs)
    turn2 = prompt(7, batch=2, seed=9)
    with hf.patched(model, method="sparq", **DENSE):
        out1 = greedy(model, ids, n=5, attention_mask=mask, return_dict_in_generate=True)
        ids2 = torch.cat([out1.sequences, turn2], 1)
        mask2 = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1)
        out2 = greedy(model, ids2, n=6, attention_mask=mask2, **hf.cache_kwargs(model, out1.past_key_values),
                      return_dict_in_generate=True)
        for layer in out2.past_key_values.layers:
            _check_side_data(layer)
    ref = greedy(model, ids2, n=6, attention_mask=mask2)
    assert torch.equal(out2.sequences, ref)


def test_decode_step_is_the_sparq_op():
    """One patched decode step equals kvsparse.sparq.attention on the cache buffers."""
    model = tiny_model(layers=1)
    ids = prompt(50)
    with hf.patched(model, method="sparq", r=8, k=12, local_window=3, reallocate=True, dense_below=0):
        cache = hf.make_cache(model)
        model(ids, **hf.cache_kwargs(model, cache))
        attn = model.model.layers[0].self_attn
        seen = {}
        hook = attn.register_forward_hook(lambda m, a, kw, out: seen.update(out=out[0]), with_kwargs=True)
        h_in = {}
        pre = attn.register_forward_pre_hook(lambda m, a, kw: h_in.update(kw=kw), with_kwargs=True)
        model(prompt(1, seed=3), **hf.cache_kwargs(model, cache), position_ids=torch.tensor([[50]]))
        hook.remove()
        pre.remove()
    layer = cache.layers[0]
    assert layer.seq_lens.tolist() == [51]
    _check_side_data(layer)
    # rebuild q from the module the way the model does, and compare the op
    hs = h_in["kw"]["hidden_states"]
    cos, sin = h_in["kw"]["position_embeddings"]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = attn.q_proj(hs).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hs).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, k, cos, sin)
    y = sparq.attention(q[:, :, 0].contiguous(), layer.keys, layer.values, layer.kt, layer.v_mean,
                        layer.seq_lens, 8, 12, 3, "group", True, attn.scaling)
    expected = attn.o_proj(y.reshape(1, 1, -1))
    torch.testing.assert_close(seen["out"], expected)


def test_small_k_differs_but_finite():
    model = tiny_model(layers=2)
    ids, cont = prompt(160, batch=2), prompt(4, batch=2, seed=7)
    ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, method="sparq", compression=1 / 16, dense_below=0):
        got = stepwise_logits(model, ids, cont, hf.make_cache(model))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 0], ref[:, 0])  # prefill is dense
    assert not torch.allclose(got[:, 1:], ref[:, 1:], atol=1e-3)


def test_dense_layers_stay_exact():
    """With every layer dense, a tiny k changes nothing."""
    model = tiny_model(layers=2)
    ids = prompt(40)
    ref = greedy(model, ids, n=8)
    with hf.patched(model, method="sparq", r=2, k=2, dense_layers=2, dense_below=0):
        assert torch.equal(greedy(model, ids, n=8), ref)


# ------------------------------------------------------- static / compiled
def test_static_cache_and_compiled_decode_equal_eager():
    torch._dynamo.reset()
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=60 + n)[0] for n in (30, 19)]
    ids, mask = left_pad(seqs)
    cc = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    cc._compile_all_devices = True
    with hf.patched(model, method="sparq", r=8, k=10, dense_layers=1, dense_below=0):
        c1 = hf.make_cache(model, batch_size=2, max_cache_len=48)
        assert isinstance(c1.layers[0], SparQStaticLayer) and c1.is_compileable
        eager = greedy(model, ids, n=10, attention_mask=mask, disable_compile=True, **hf.cache_kwargs(model, c1))
        compiled = greedy(model, ids, n=10, attention_mask=mask, compile_config=cc,
                          **hf.cache_kwargs(model, hf.make_cache(model, batch_size=2, max_cache_len=48)))
        assert "_compiled_call" in model.__dict__
        dyn = greedy(model, ids, n=10, attention_mask=mask)
    assert torch.equal(compiled, eager)
    assert torch.equal(dyn, eager)


def test_beam_search_equals_unpatched():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=80 + n)[0] for n in (30, 17)]
    ids, mask = left_pad(seqs)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2,
              do_sample=False, pad_token_id=PAD)
    ref = model.generate(ids, **kw)
    with hf.patched(model, method="sparq", **DENSE):
        assert torch.equal(model.generate(ids, **kw), ref)
