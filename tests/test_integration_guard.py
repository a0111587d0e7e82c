"""Never silently dense: every way the decode step can miss the kvsparse
attention raises ``kvsparse.IntegrationError`` (tiny random Llama, CPU)."""
import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import kvsparse  # noqa: E402
from kvsparse import _compat, hf  # noqa: E402

from test_hf_patch import prompt, tiny_model  # noqa: E402

METHODS = {"quest": dict(token_budget=16, page_size=8), "sparq": dict(r=8, k=8, dense_below=0), "qaq": dict()}


def _cache_kw(model, cache):
    return {model.__dict__[hf._STATE_ATTR]["cache_kwarg"]: cache}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_decode_over_a_plain_dynamic_cache_raises(method):
    model = tiny_model(layers=2)
    ids = prompt(20)
    with hf.patched(model, method=method, **METHODS[method]), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, use_cache=True, **_cache_kw(model, cache))  # a prefill is dense in every method
        with pytest.raises(kvsparse.IntegrationError, match=method):
            model(prompt(1, seed=3), use_cache=True, **_cache_kw(model, cache))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cache_of_another_method_raises(method):
    model = tiny_model(layers=2)
    other = "sparq" if method == "quest" else "quest"
    with hf.patched(model, method=other, **METHODS[other]):
        cache = kvsparse.make_cache(model)
    with hf.patched(model, method=method, **METHODS[method]), torch.no_grad():
        with pytest.raises(kvsparse.IntegrationError, match="make_cache"):
            model(prompt(20), use_cache=True, **_cache_kw(model, cache))


def test_unpatched_model_with_a_kvsparse_cache_raises():
    """The prefill stored by an unpatched model is never committed: the next
    update says so instead of decoding over uncommitted buffers."""
    model = tiny_model(layers=2)
    with hf.patched(model, method="quest", **METHODS["quest"]):
        cache = kvsparse.make_cache(model)
        key = model.__dict__[hf._STATE_ATTR]["cache_kwarg"]
    with torch.no_grad():
        model(prompt(20), use_cache=True, **{key: cache})
        with pytest.raises(kvsparse.IntegrationError, match="never committed"):
            model(prompt(1, seed=3), use_cache=True, **{key: cache})


def test_decode_token_not_read_raises():
    """A decode append whose attention did not read it is caught at the next step."""
    model = tiny_model(layers=2)
    with hf.patched(model, method="quest", **METHODS["quest"]), torch.no_grad():
        cache = kvsparse.make_cache(model)
        layer = cache.layers[0]
        model(prompt(20), use_cache=True, **_cache_kw(model, cache))
        k = torch.randn(1, layer.num_heads, 1, layer.head_dim)
        layer.update(k, k)  # an append the kvsparse attention never saw
        with pytest.raises(kvsparse.IntegrationError, match="did not read"):
            layer.update(k, k)


def test_self_check_catches_a_hook_that_finds_no_cache(monkeypatch):
    """If a transformers release passed the cache under a name the hook does
    not read, patch() raises (and leaves the model unpatched)."""
    model = tiny_model(layers=2)
    real = _compat.cache_kwarg

    def wrong_name(fn, what):
        name, idx = real(fn, what)
        return ("not_the_cache", None) if "Attention" in what else (name, idx)

    monkeypatch.setattr(_compat, "cache_kwarg", wrong_name)
    with pytest.raises(kvsparse.IntegrationError, match="self-check"):
        hf.patch(model, method="quest", **METHODS["quest"])
    assert not hf.is_patched(model)
    assert model.config._attn_implementation != "kvsparse"


def test_one_token_forward_without_a_cache_is_allowed():
    """A one-token forward into the empty cache the model makes itself is a
    prefill (dense in every method), not a decode step."""
    model = tiny_model(layers=2)
    with hf.patched(model, method="quest", **METHODS["quest"]), torch.no_grad():
        model(prompt(1))


@pytest.mark.parametrize("impl", [None, "static", "hybrid"])
def test_generate_makes_the_kvsparse_cache(impl):
    """generate() builds the method's cache, static for "static" and the
    deprecated static aliases checkpoints carry (Gemma 3's "hybrid")."""
    from kvsparse import _compat

    if impl is not None and impl not in _compat.static_cache_names():
        pytest.skip(f"{impl!r} is not a cache implementation of this transformers")
    model = tiny_model(layers=2)
    model.generation_config.cache_implementation = impl
    with hf.patched(model, method="quest", **METHODS["quest"]):
        out = model.generate(prompt(20), attention_mask=torch.ones(1, 20, dtype=torch.long), max_new_tokens=4,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, kvsparse.QuestCache)
    if impl == "static":  # (transformers itself turns "hybrid" into a dynamic cache on some versions)
        assert cache.is_compileable
