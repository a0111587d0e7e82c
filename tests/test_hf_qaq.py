"""kvsparse.patch(method="qaq") on Hugging Face LLaMA-family models (tiny random models, CPU)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from kvsparse import hf, qaq  # noqa: E402
from kvsparse.cache import KVSparseCache, QAQCache, QAQDynamicLayer, QAQStaticLayer  # noqa: E402
from kvsparse.config import QAQConfig, make_config  # noqa: E402

from test_hf_patch import eager_and_compiled, greedy, left_pad, prompt, stepwise_logits, tiny_model  # noqa: E402

# every token at 8 bits, never re-quantized, no outliers
EIGHT = dict(allowed=(8,), requant_every=0, alpha=0.0)
# an adaptive setting that lowers many widths on the tiny random model
ADAPT = dict(sigma=0.05, requant_every=2, window=3, n_recent=2)


def _stores(cache):
    for layer in cache.layers:
        yield layer, layer.ks
        yield layer, layer.vs


# ---------------------------------------------------------------- config
def test_config_defaults_repr_and_dict():
    c = QAQConfig()
    assert c.allowed == (2, 4, 8) and c.window == 5 and c.shared is True and c.uniform_bits is None
    assert c.max_width == 8 and c.adaptive
    assert c.value_sigma == QAQConfig.DEFAULT_SIGMA
    assert c.key_sigma == pytest.approx(QAQConfig.KEY_SIGMA_RATIO * QAQConfig.DEFAULT_SIGMA)
    assert repr(c).startswith("QAQConfig(") and "window=5" in repr(c)
    d = c.to_dict()
    assert d["method"] == "qaq" and d["alpha"] == c.alpha
    c2 = make_config("qaq", sigma=0.1, sigma_k=1e-3, allowed=[8, 2, 4])
    assert c2.allowed == (2, 4, 8) and c2.value_sigma == 0.1 and c2.key_sigma == 1e-3
    assert make_config(c2, sigma=0.2).value_sigma == 0.2
    u = QAQConfig(uniform_bits=4)
    assert u.max_width == 4 and not u.adaptive
    assert QAQConfig(alpha=0.02).value_alpha == 0.02 and QAQConfig(alpha=0.02, alpha_v=0).value_alpha == 0.0
    assert QAQConfig().store_dtype(torch.float32) == torch.float16
    assert QAQConfig().store_dtype(torch.bfloat16) == torch.bfloat16
    assert QAQConfig(cache_dtype="float32").store_dtype(torch.float16) == torch.float32


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(sigma=0), "sigma"),
        (dict(sigma_k=-1.0), "sigma_k"),
        (dict(sigma_v="x"), "sigma_v"),
        (dict(allowed=(3, 8)), "allowed"),
        (dict(allowed=(0,)), "allowed"),
        (dict(allowed=()), "allowed"),
        (dict(alpha=0.6), "alpha"),
        (dict(alpha_v=-0.1), "alpha_v"),
        (dict(window=0), "window"),
        (dict(n_recent=-1), "n_recent"),
        (dict(shared=1), "shared"),
        (dict(dense_layers=-1), "dense_layers"),
        (dict(requant_every=-1), "requant_every"),
        (dict(compact_every=1.5), "compact_every"),
        (dict(uniform_bits=3), "uniform_bits"),
        (dict(cache_dtype="int8"), "cache_dtype"),
        (dict(max_cache_len=0), "max_cache_len"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QAQConfig(**kwargs)
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match=field):
        hf.patch(model, method="qaq", **kwargs)
    assert not hf.is_patched(model)


def test_unknown_option_names_valid_fields():
    with pytest.raises(ValueError, match="sigma"):
        make_config("qaq", sigmas=0.1)


# ------------------------------------------------------------- 8 bits ~ dense
def test_eight_bits_greedy_equals_unpatched():
    model = tiny_model(layers=2)
    ids = prompt(41)
    ref = greedy(model, ids, n=16)
    hf.patch(model, method="qaq", **EIGHT)
    assert isinstance(model.kvsparse_config, QAQConfig)
    out = greedy(model, ids, n=16, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, QAQCache)
    layer = cache.layers[-1]
    assert isinstance(layer, QAQDynamicLayer)
    assert layer.seq_lens.tolist() == [41 + 16 - 1]
    assert torch.equal(out.sequences, ref)
    for _, st in _stores(cache):
        assert (st.widths[0, :, :56] == 8).all()
    hf.unpatch(model)


def test_eight_bits_logits_close_to_dense():
    model = tiny_model(layers=2)
    ids, cont = prompt(45, batch=2), prompt(6, batch=2, seed=5)
    ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, method="qaq", **EIGHT):
        got = stepwise_logits(model, ids, cont, hf.make_cache(model))
    torch.testing.assert_close(got[:, 0], ref[:, 0])  # the prefill is the model's dense attention
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


def decode_step_and_query(model, **patch_kwargs):
    """A 50-token prefill and one decode step of a patched one-layer model:
    ``(the attention module's output, the step's post-RoPE query [1, H, 1, D],
    the cache layer, the attention module)``."""
    ids = prompt(50)
    with hf.patched(model, method="qaq", **patch_kwargs):
        cache = hf.make_cache(model)
        model(ids, **hf.cache_kwargs(model, cache))
        attn = model.model.layers[0].self_attn
        seen, h_in = {}, {}
        hook = attn.register_forward_hook(lambda m, a, kw, out: seen.update(out=out[0]), with_kwargs=True)
        pre = attn.register_forward_pre_hook(lambda m, a, kw: h_in.update(kw=kw), with_kwargs=True)
        model(prompt(1, seed=3), **hf.cache_kwargs(model, cache), position_ids=torch.tensor([[50]]))
        hook.remove()
        pre.remove()
    layer = cache.layers[0]
    assert layer.seq_lens.tolist() == [51]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hs = h_in["kw"]["hidden_states"]
    cos, sin = h_in["kw"]["position_embeddings"]
    q = attn.q_proj(hs).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hs).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, k, cos, sin)
    return seen["out"], q, layer, attn


def test_decode_step_is_the_qaq_op():
    """One patched decode step equals kvsparse.qaq.attention on the cache's stores."""
    out, q, layer, attn = decode_step_and_query(tiny_model(layers=1), **EIGHT)
    y = qaq.attention(q[:, :, 0].half().contiguous(), layer.ks, layer.vs, layer.seq_lens, attn.scaling).float()
    torch.testing.assert_close(out, attn.o_proj(y.reshape(1, 1, -1)))


# ------------------------------------------------------------ memory honesty
def test_no_dense_buffers_and_memory_report_matches_stores():
    model = tiny_model(layers=2)
    ids = prompt(70, batch=2)
    with hf.patched(model, method="qaq", **ADAPT):
        out = greedy(model, ids, n=12, return_dict_in_generate=True)
    cache = out.past_key_values
    B, Hkv, D = 2, 2, 32
    for layer in cache.layers:
        assert layer.keys is None and layer.values is None
        # no [B, Hkv, cap, D] floating buffer anywhere in the layer
        tensors = [t for t in vars(layer).values() if torch.is_tensor(t)]
        tensors += [t for st in (layer.ks, layer.vs) for t in st.tensors()] + [layer.window.hist]
        for t in tensors:
            assert not (t.is_floating_point() and t.dim() == 4 and t.shape[-1] == D and t.shape[1] == Hkv), t.shape
        assert layer.ks.sz.dtype == torch.float16  # float32 model: 16-bit scales / outliers
    rep = cache.memory_report()
    parts = [qaq.memory_report(st, layer.seq_lens) for layer, st in _stores(cache)]
    for key in ("codes", "scale_zero", "widths", "offsets", "outliers", "total", "fp16", "arena"):
        assert rep[key] == sum(p[key] for p in parts), key
    assert rep["fp16"] == 2 * len(cache.layers) * 2 * (70 + 11) * Hkv * D * 2  # K and V, 2 sequences, fp16
    assert rep["compression"] == pytest.approx(rep["fp16"] / rep["total"])
    assert rep["compression"] > 2  # widths were lowered
    # the codes counted are the bytes of the packed arena in use
    for layer, st in _stores(cache):
        widths = st.widths[:, :, : layer.capacity].clone()
        widths[torch.arange(layer.capacity)[None, None] >= layer.seq_lens.view(-1, 1, 1)] = 0
        _, nbytes = qaq.packed_offsets(widths, st.group_elems)
        used = layer.used_k if st is layer.ks else layer.used_v
        assert (used >= nbytes).all() and (used <= st.arena.shape[1]).all()


def test_compaction_is_exact_and_shrinks_arena():
    model = tiny_model(layers=1)
    ids = prompt(200)
    with hf.patched(model, method="qaq", compact_every=0, **ADAPT):
        cache = hf.make_cache(model)
        greedy(model, ids, n=10, **hf.cache_kwargs(model, cache))
        layer = cache.layers[0]
        n_comp = layer.num_compactions
        before = [qaq.dequantize(st, layer.seq_lens) for st in (layer.ks, layer.vs)]
        used_before = layer.used_k.clone()
        cache.compact()
        assert layer.num_compactions == n_comp + 1
        after = [qaq.dequantize(st, layer.seq_lens) for st in (layer.ks, layer.vs)]
        for a, b in zip(before, after):
            assert torch.equal(a, b)
        assert (layer.used_k <= used_before).all()
        _, nbytes = qaq.packed_offsets(layer.ks.widths, layer.ks.group_elems)
        assert torch.equal(layer.used_k, nbytes)


def test_uniform_bits_baseline():
    model = tiny_model(layers=2)
    ids = prompt(30)
    with hf.patched(model, method="qaq", uniform_bits=4, alpha=0.0):
        out = greedy(model, ids, n=6, return_dict_in_generate=True)
    cache = out.past_key_values
    for layer, st in _stores(cache):
        n = int(layer.seq_lens[0])
        assert (st.widths[0, :, :n] == 4).all()
    rep = cache.memory_report()
    # shared groups: 1 group of 64 elements per token: 32 code bytes + 9 metadata vs 128 fp16 bytes
    assert rep["total"] == rep["fp16"] * (32 + 9) // 128


# ------------------------------------------------------------ left padding
def test_left_padding_batched_equals_single():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=20 + n)[0] for n in (70, 33, 12)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method="qaq", **ADAPT):
        out = greedy(model, ids, n=8, attention_mask=mask, return_dict_in_generate=True)
        for layer in out.past_key_values.layers:
            assert layer.seq_lens.tolist() == [len(s) + 7 for s in seqs]
        for i, s in enumerate(seqs):
            single = greedy(model, s[None], n=8, return_dict_in_generate=True)
            assert torch.equal(out.sequences[i, ids.shape[1]:], single.sequences[0, s.shape[0]:]), i
            for lb, ls in zip(out.past_key_values.layers, single.past_key_values.layers):
                n = len(s) + 7
                for sb, ss in ((lb.ks, ls.ks), (lb.vs, ls.vs)):
                    assert torch.equal(sb.widths[i, :, :n], ss.widths[0, :, :n])
        # whatever sits at the padded positions cannot change the result
        ids2 = ids.clone()
        ids2[mask == 0] = 77
        out2 = greedy(model, ids2, n=8, attention_mask=mask)
        assert torch.equal(out2[:, ids.shape[1]:], out.sequences[:, ids.shape[1]:])


# ------------------------------------------------------------ widths only fall
def test_widths_only_fall_and_new_tokens_get_the_largest():
    model = tiny_model(layers=2)
    ids, cont = prompt(60, batch=2), prompt(12, batch=2, seed=4)
    with hf.patched(model, method="qaq", allowed=(1, 2, 4, 8), **ADAPT):
        cache = hf.make_cache(model)
        model(ids, **hf.cache_kwargs(model, cache))
        prev = None
        lowered = False
        for i in range(cont.shape[1]):
            pos = torch.full((2, 1), 60 + i, dtype=torch.long)
            model(cont[:, i:i + 1], **hf.cache_kwargs(model, cache), position_ids=pos)
            now = [st.widths.clone() for _, st in _stores(cache)]
            n = int(cache.layers[0].seq_lens[0])
            if prev is not None:
                for a, b in zip(prev, now):
                    assert (b[:, :, : n - 1] <= a[:, :, : n - 1]).all()
                    lowered |= bool((b[:, :, : n - 1] < a[:, :, : n - 1]).any())
            prev = now
        for _, st in _stores(cache):
            assert (st.widths[:, :, n - 2:n] == 8).all()  # the newest (n_recent = 2) keep 8 bits
            assert set(st.widths[:, :, :n].unique().tolist()) <= {1, 2, 4, 8}
    assert lowered


def test_dense_layers_keep_the_largest_width():
    model = tiny_model(layers=2)
    with hf.patched(model, method="qaq", dense_layers=1, **ADAPT):
        out = greedy(model, prompt(50), n=8, return_dict_in_generate=True)
    l0, l1 = out.past_key_values.layers
    n = int(l0.seq_lens[0])
    assert (l0.ks.widths[0, :, :n] == 8).all() and (l0.vs.widths[0, :, :n] == 8).all()
    assert (l1.vs.widths[0, :, :n] < 8).any()


# ------------------------------------------------------- static, turns, copies
def test_static_cache_equals_dynamic():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=60 + n)[0] for n in (30, 19)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method="qaq", **ADAPT):
        c1 = hf.make_cache(model, batch_size=2, max_cache_len=48)
        assert isinstance(c1.layers[0], QAQStaticLayer)
        static = greedy(model, ids, n=10, attention_mask=mask, **hf.cache_kwargs(model, c1))
        dyn = greedy(model, ids, n=10, attention_mask=mask, return_dict_in_generate=True)
    assert torch.equal(static, dyn.sequences)
    for ls, ld in zip(c1.layers, dyn.past_key_values.layers):
        assert torch.equal(ls.seq_lens, ld.seq_lens)
        n = int(ls.seq_lens.max())
        assert torch.equal(ls.vs.widths[:, :, :n], ld.vs.widths[:, :, :n])
    rs, rd = c1.memory_report(), dyn.past_key_values.memory_report()
    assert rs["total"] == rd["total"]
    for layer in c1.layers:  # fixed 8-bit slots: 48 tokens x 64 elements (shared groups)
        assert layer.ks.arena.shape == (2, 48 * 64) and layer.vs.arena.shape == (2, 48 * 64)


def test_compiled_static_decode_equals_eager():
    """The static QAQ layer is compileable (fullgraph): the compiled decode step,
    re-quantizing on its device schedule, gives the eager tokens and widths."""
    torch._dynamo.reset()
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=60 + n)[0] for n in (30, 19)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method="qaq", **ADAPT):
        eager, compiled, c_eager, c_comp = eager_and_compiled(model, ids, mask)
    assert c_eager.is_compileable
    assert torch.equal(compiled, eager)
    lowered = False
    for le, lc in zip(c_eager.layers, c_comp.layers):
        assert torch.equal(le.seq_lens, lc.seq_lens)
        for a, b in ((le.ks, lc.ks), (le.vs, lc.vs)):
            assert torch.equal(a.widths, b.widths)
            lowered |= bool((a.widths[:, :, :30] < 8).any())
        # every tensor the step mutates is still the one marked static at
        # allocation (a rebinding makes CUDA graphs skip the step: "mutated inputs")
        for t in lc.state_tensors():
            assert getattr(t, "_dynamo_static_input_type", None) is not None
        # device ring index: the prefill pushes `window` rows, then one per decode step
        assert int(lc.window.step) == int(le.window.step) == ADAPT["window"] + 9
    assert lowered


def test_uniform_tiles():
    g = torch.Generator().manual_seed(3)
    w = torch.tensor([2, 4, 8], dtype=torch.uint8)[torch.randint(0, 3, (2, 3, 45), generator=g)]
    lens = torch.tensor([45, 37], dtype=torch.int32)
    u = qaq.uniform_tiles(w, lens, 16)
    for b, n in enumerate(lens.tolist()):
        for t0 in range(0, 45, 16):
            tile = slice(t0, min(t0 + 16, 45))
            if t0 + 16 <= n:  # a complete tile: one width, the largest of its tokens
                assert (u[b, :, tile] == w[b, :, tile].amax(-1, keepdim=True)).all()
            else:  # the incomplete last tile (and beyond) is left as it is (8: never lowered)
                assert (u[b, :, tile] == 8).all()
    assert qaq.uniform_tiles(w, lens, 1) is w
    with pytest.raises(ValueError, match="tile"):
        qaq.uniform_tiles(w, lens, 0)


def test_tile_widths_give_uniform_tiles_in_generate():
    model = tiny_model(layers=2)
    ids = prompt(70, batch=2)
    for tile in (1, 16):
        with hf.patched(model, method="qaq", allowed=(2, 4, 8), tile_widths=tile, **ADAPT):
            out = greedy(model, ids, n=12, return_dict_in_generate=True)
        mixed = 0
        for layer in out.past_key_values.layers:
            n = int(layer.seq_lens.min())
            for st in (layer.ks, layer.vs):
                w = st.widths[:, :, : n // 16 * 16].reshape(2, st.widths.shape[1], -1, 16)
                mixed += int((w.amax(-1) != w.amin(-1)).sum())
        assert (mixed == 0) == (tile == 16), (tile, mixed)


def test_multi_turn_continuation():
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=40 + n)[0] for n in (18, 26)]
    ids, mask = left_pad(seqs)
    turn2 = prompt(7, batch=2, seed=9)
    with hf.patched(model, method="qaq", **EIGHT):
        out1 = greedy(model, ids, n=5, attention_mask=mask, return_dict_in_generate=True)
        ids2 = torch.cat([out1.sequences, turn2], 1)
        mask2 = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1)
        out2 = greedy(model, ids2, n=6, attention_mask=mask2, **hf.cache_kwargs(model, out1.past_key_values),
                      return_dict_in_generate=True)
        for layer in out2.past_key_values.layers:
            assert layer.seq_lens.tolist() == [len(s) + 5 + 7 + 5 for s in seqs]
    ref = greedy(model, ids2, n=6, attention_mask=mask2)
    assert torch.equal(out2.sequences, ref)  # 8 bits: the same tokens


def test_deepcopy_and_reset():
    model = tiny_model(layers=1)
    with hf.patched(model, method="qaq", **ADAPT):
        cache = hf.make_cache(model)
        model(prompt(40), **hf.cache_kwargs(model, cache))
        c2 = copy.deepcopy(cache)
        assert c2.memory_report() == cache.memory_report()
        model(prompt(1, seed=2), **hf.cache_kwargs(model, c2), position_ids=torch.tensor([[40]]))
        assert cache.layers[0].seq_lens.tolist() == [40] and c2.layers[0].seq_lens.tolist() == [41]
        c2.reset()
        assert c2.layers[0].seq_lens.tolist() == [0] and c2.memory_report()["total"] == 0


def test_for_config_and_make_cache():
    assert isinstance(KVSparseCache.for_config(QAQConfig(), num_layers=2), QAQCache)
    model = tiny_model(layers=2)
    with hf.patched(model, method="qaq", max_cache_len=64):
        c = hf.make_cache(model, batch_size=1)
        assert isinstance(c.layers[0], QAQStaticLayer) and c.layers[1].layer_idx == 1


# ------------------------------------------------------------------ unpatch
def test_unpatch_restores_bit_identical_logits():
    model = tiny_model(layers=2)
    ids = prompt(33)
    ref = model(ids).logits
    ref_gen = greedy(model, ids, n=6)
    hf.patch(model, method="qaq", **ADAPT)
    assert hf.is_patched(model)
    hf.unpatch(model)
    assert not hf.is_patched(model) and not hasattr(model, "kvsparse_config")
    assert torch.equal(model(ids).logits, ref)
    assert torch.equal(greedy(model, ids, n=6), ref_gen)


# --------------------------------------------------------------------- eval
def test_eval_runs_and_measured_compression():
    from kvsparse import eval as ev

    runs = ev.make_runs(["qaq"], [], [{}, {"sigma": 0.01, "alpha": 0}, {"uniform_bits": 4}],
                        sigmas=[0.02, 0.05])
    assert [r.label for r in runs] == ["dense", "qaq-0.02", "qaq-0.05", "qaq-0.01-alpha=0", "qaq-uniform_bits=4"]
    model, tok = ev.tiny_model(num_layers=2)
    text = "The quick brown fox jumps over the lazy dog. " * 8
    recs = ev.run_ppl(model, tok, runs[:2] + runs[-1:], text, [200], window=20, progress=False)
    assert "compression" not in recs[0]
    for r in recs[1:]:
        assert r["compression"]["200"] > 1.5 and r["memory"]["200"]["total"] > 0
    table = ev.ppl_table(recs, [200])
    assert "measured compression @ 200" in table and "| dense |" in table
    assert "measured compression" not in ev.ppl_table(recs[:1], [200])  # other methods' tables unchanged
