"""The Hugging Face contract of every registered method (tiny random Llama, CPU).

Parametrised over ``kvsparse.methods.names()``: a method gets these tests by
registering. Each method says which of its configs makes a decode step dense
attention (``Method.lossless_kwargs``: Quest a budget covering every page,
SparQ ``r = D`` and ``k`` every position, QAQ every token at 8 bits) and how
close the logits are then (``Method.lossless_tolerance``).
"""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import kvsparse  # noqa: E402
from kvsparse import hf, methods  # noqa: E402
from kvsparse.cache import KVCacheLayer, KVSparseCache, cache_class  # noqa: E402

from test_hf_patch import greedy, left_pad, prompt, stepwise_logits, tiny_model  # noqa: E402

HEAD_DIM = 32  # tiny_model's
MAX_LEN = 128  # no test below stores more tokens per sequence


@pytest.fixture(params=methods.names())
def method(request):
    return methods.get(request.param)


def _lossless(method):
    return method.lossless_kwargs(HEAD_DIM, MAX_LEN)


def _cache_kw(model, cache):
    return {model.__dict__[hf._STATE_ATTR]["cache_kwarg"]: cache}


def test_registry_entry(method):
    cfg = kvsparse.make_config(method.name, **_lossless(method))
    assert type(cfg) is method.config_class and cfg.method == method.name
    assert getattr(kvsparse, f"{method.title}Config") is method.config_class
    assert getattr(kvsparse, f"{method.title}Cache") is cache_class(method)
    assert type(KVSparseCache.for_config(cfg, num_layers=2)) is cache_class(method)
    with pytest.raises(ValueError, match="valid: .*chunk_size"):
        kvsparse.make_config(method.name, no_such_field=1)
    # what the evaluation reads
    names = {f.name for f in dataclasses.fields(method.config_class)}
    assert {"dense_layers", "max_cache_len", "chunk_size"} <= names  # MethodConfig's
    assert method.sweep_kwarg in names and method.sweep_values in ("budgets", "compressions", "sigmas")
    assert set(method.no_sweep_kwargs) <= names and set(method.eval_defaults) <= names
    assert method.cache_kwargs is None or set(method.cache_kwargs) <= names


def test_evaluation_reads_the_registry(method):
    """The evaluation's per-method table is the registry's facts."""
    from kvsparse.eval import runs

    spec = runs.METHODS[method.name]
    assert spec.sweep_kwarg == method.sweep_kwarg and spec.sweep_over == method.sweep_values
    assert spec.sweep_type is method.sweep_type and spec.defaults == method.eval_defaults
    assert spec.fixed_by == tuple(method.no_sweep_kwargs) and spec.cache_kwargs == method.cache_kwargs
    assert spec.patch_defaults == method.eval_patch_defaults


def test_lossless_config_is_dense_attention(method, monkeypatch):
    """Every decode step of every layer runs the method (never a dense
    fallback), and the logits are the unpatched model's."""
    calls = []
    decode = type(method).decode

    def counted(self, *args, **kwargs):
        calls.append(1)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(type(method), "decode", counted)
    model = tiny_model(layers=2)
    ids, cont = prompt(45, batch=2), prompt(6, batch=2, seed=5)
    ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, method=method.name, **_lossless(method)):
        calls.clear()  # (the patch's self-check decodes too)
        cache = hf.make_cache(model)
        got = stepwise_logits(model, ids, cont, cache)
    assert type(cache) is cache_class(method)
    assert len(calls) == 2 * cont.shape[1]  # layers x decode steps
    torch.testing.assert_close(got[:, 0], ref[:, 0])  # the prefill is the model's dense attention
    atol, rtol = method.lossless_tolerance
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)


def test_left_padding_batched_equals_single(method):
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=20 + n)[0] for n in (40, 21, 9)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method=method.name, **_lossless(method)):
        out = greedy(model, ids, n=8, attention_mask=mask, return_dict_in_generate=True)
        for layer in out.past_key_values.layers:  # padding is never stored
            assert layer.seq_lens.tolist() == [len(s) + 7 for s in seqs]
        for i, s in enumerate(seqs):
            single = greedy(model, s[None], n=8)
            assert torch.equal(out.sequences[i, ids.shape[1]:], single[0, s.shape[0]:]), i
        # whatever sits at the padded positions cannot change the result
        ids2 = ids.clone()
        ids2[mask == 0] = 77
        out2 = greedy(model, ids2, n=8, attention_mask=mask)
    assert torch.equal(out2[:, ids.shape[1]:], out.sequences[:, ids.shape[1]:])


def test_unpatch_restores_bit_identical_logits(method):
    model = tiny_model(layers=2)
    ids = prompt(33, batch=2)
    before, gen_before = model(ids).logits, greedy(model, ids, n=6)
    impl = model.config._attn_implementation
    hf.patch(model, method=method.name, **_lossless(method))
    greedy(model, ids, n=6)
    hf.unpatch(model)
    assert not hf.is_patched(model) and not hasattr(model, "kvsparse_config")
    assert model.config._attn_implementation == impl
    assert torch.equal(model(ids).logits, before)
    assert torch.equal(greedy(model, ids, n=6), gen_before)


def test_static_cache_equals_dynamic(method):
    model = tiny_model(layers=2)
    seqs = [prompt(n, seed=60 + n)[0] for n in (30, 19)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method=method.name, **_lossless(method)):
        cache = hf.make_cache(model, batch_size=2, max_cache_len=48)
        assert cache.is_compileable and type(cache) is cache_class(method)
        assert all(isinstance(layer, KVCacheLayer) and layer.is_compileable for layer in cache.layers)
        static = greedy(model, ids, n=10, attention_mask=mask, **kvsparse.cache_kwargs(model, cache), disable_compile=True)
        dynamic = greedy(model, ids, n=10, attention_mask=mask, return_dict_in_generate=True)
    assert not dynamic.past_key_values.is_compileable
    assert torch.equal(static, dynamic.sequences)
    assert int(cache.get_seq_length()) == 30 + 9
    with hf.patched(model, method=method.name, **_lossless(method)):
        with pytest.raises(ValueError, match="max_cache_len"):
            greedy(model, prompt(60), n=4, **kvsparse.cache_kwargs(model, hf.make_cache(model, max_cache_len=48)))


def test_foreign_cache_raises(method):
    """A decode step over transformers' cache, or over another method's cache,
    raises instead of running dense attention."""
    model = tiny_model(layers=2)
    with hf.patched(model, method=method.name, **_lossless(method)), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(prompt(20), use_cache=True, **_cache_kw(model, cache))  # a prefill is dense in every method
        with pytest.raises(kvsparse.IntegrationError, match=method.name):
            model(prompt(1, seed=3), use_cache=True, **_cache_kw(model, cache))
    for other in methods.names():
        if other == method.name:
            continue
        with hf.patched(model, method=other, **_lossless(methods.get(other))):
            cache = kvsparse.make_cache(model)
        with hf.patched(model, method=method.name, **_lossless(method)), torch.no_grad():
            with pytest.raises(kvsparse.IntegrationError, match="make_cache"):
                model(prompt(20), use_cache=True, **_cache_kw(model, cache))


def test_a_new_method_is_one_module(monkeypatch):
    """A method defined outside the package (its config and decode step, the
    default dense storage) gets its cache classes and runs under patch()."""
    from kvsparse import cache as cache_module
    from kvsparse.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(cache_module, "_CLASSES", dict(cache_module._CLASSES))

    @dataclasses.dataclass(repr=True, eq=True)
    class ExactConfig(methods.MethodConfig):
        method = "exact"

    class Exact(methods.Method):
        """Exact attention over the dense storage."""

        name, title, config_class = "exact", "Exact", ExactConfig

        def lossless_kwargs(self, head_dim, length):
            return {}

        def decode(self, q, layer, config, dense, scaling):
            B, H, D = q.shape
            T = layer.capacity
            keys = layer.keys.repeat_interleave(H // layer.num_heads, dim=1)
            values = layer.values.repeat_interleave(H // layer.num_heads, dim=1)
            s = torch.einsum("bhd,bhtd->bht", q.float(), keys.float()) * scaling
            s = s.masked_fill(torch.arange(T).view(1, 1, T) >= layer.seq_lens.view(B, 1, 1), float("-inf"))
            return torch.einsum("bht,bhtd->bhd", torch.softmax(s, -1), values.float()).to(q.dtype)

    methods.register(Exact())
    model = tiny_model(layers=2)
    ids = prompt(30, batch=2)
    ref = greedy(model, ids, n=6)
    with hf.patched(model, method="exact"):
        out = greedy(model, ids, n=6, return_dict_in_generate=True)
    cache = out.past_key_values
    assert type(cache).__name__ == "ExactCache" and type(cache.layers[0]).__name__ == "ExactDynamicLayer"
    assert isinstance(cache.layers[0], KVCacheLayer) and cache.layers[0].seq_lens.tolist() == [35, 35]
    assert torch.equal(out.sequences, ref)
