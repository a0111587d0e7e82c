"""kvsparse.patch on every supported model family (tiny random configs, CPU),
for every method: Llama, Llama-3.x rope scaling, Mistral, Qwen2, Qwen3 (q/k
norms) and Gemma 3 (sliding-window and full layers, head_dim 256,
``query_pre_attn_scalar`` scaling).

Per family and method: (a) lossless at full budget, (b) never silently dense:
a small budget changes the logits, (c) a left-padded batch equals single runs.
"""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from kvsparse import _compat, hf  # noqa: E402
from kvsparse.cache import KVCacheLayer, sliding_layers  # noqa: E402
from kvsparse.config import make_config  # noqa: E402

from test_hf_patch import greedy, left_pad, prompt, stepwise_logits, tiny_model  # noqa: E402


def _family(module, config, model):
    found = _compat.find_classes(f"transformers.models.{module}.configuration_{module}", config)
    classes = _compat.find_classes(f"transformers.models.{module}.modeling_{module}", model)
    assert found and classes, f"transformers {_compat.transformers_version()} lacks {model}"
    return found[0], classes[0]


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

#: family -> (arch for tiny_model, config overrides)
FAMILIES = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": (("qwen3", "Qwen3Config", "Qwen3ForCausalLM"), {}),
    # head_dim 256, a scaling that is not head_dim ** -0.5, a window shorter than the prompts
    "gemma3": (("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM"),
               dict(head_dim=256, query_pre_attn_scalar=64, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}
LAYERS = {"gemma3": 3}
HEAD_DIM = {"gemma3": 256}


def family_model(name, **extra):
    arch, overrides = FAMILIES[name]
    if not isinstance(arch, str):
        arch = _family(*arch)
    return tiny_model(arch, layers=LAYERS.get(name, 2), **{**overrides, **extra})


def lossless(method, head_dim):
    """Settings under which the method computes exact attention (QAQ: 8 bits everywhere)."""
    return {
        "quest": dict(token_budget=1024, page_size=16, dense_layers=0),
        "sparq": dict(r=head_dim, k=100000, reallocate=False),
        "qaq": dict(allowed=(8,), requant_every=0, alpha=0.0),
    }[method]


def small(method):
    """Settings under which the method drops (or quantizes) most of a 100-token context."""
    return {
        "quest": dict(token_budget=16, page_size=16, dense_layers=0),
        "sparq": dict(compression=1 / 16, dense_below=0),
        "qaq": dict(sigma=0.05, requant_every=2, window=3, n_recent=2),
    }[method]


def padded(method):
    """Settings with the method active on the left-padded prompts (up to 45 tokens)."""
    return {
        "quest": dict(token_budget=32, page_size=8, dense_layers=0),
        "sparq": dict(r=8, k=16, dense_below=0),
        "qaq": dict(sigma=0.05, requant_every=2, window=3, n_recent=2),
    }[method]


METHODS = ["quest", "sparq", "qaq"]
CASES = [(f, m) for f in FAMILIES for m in METHODS]
IDS = [f"{f}-{m}" for f, m in CASES]


def _check_layers(model, cache):
    """The sliding layers of a hybrid model are transformers' own; the others are the method's."""
    native = set(sliding_layers(model.config))
    assert cache.native_layers == native
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, KVCacheLayer) == (i not in native), (i, type(layer).__name__)
        if i in native:
            assert layer.is_sliding


@pytest.mark.parametrize("family, method", CASES, ids=IDS)
def test_lossless_equals_unpatched(family, method):
    model = family_model(family)
    ids = prompt(37)
    D = HEAD_DIM.get(family, 32)
    if method == "qaq":  # 8-bit codes: close to dense, the prefill exact
        cont = prompt(6, seed=5)
        ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
        with hf.patched(model, method=method, **lossless(method, D)):
            cache = hf.make_cache(model)
            got = stepwise_logits(model, ids, cont, cache)
        _check_layers(model, cache)
        torch.testing.assert_close(got[:, 0], ref[:, 0])
        torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)
        return
    ref = greedy(model, ids, n=10)
    with hf.patched(model, method=method, **lossless(method, D)):
        out = greedy(model, ids, n=10, return_dict_in_generate=True)
    _check_layers(model, out.past_key_values)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("family, method", CASES, ids=IDS)
def test_small_budget_differs_from_dense(family, method):
    """Never silently dense: the method's decode changes the logits."""
    model = family_model(family)
    ids, cont = prompt(100), prompt(3, seed=7)
    ref = stepwise_logits(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, method=method, **small(method)):
        got = stepwise_logits(model, ids, cont, hf.make_cache(model))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 0], ref[:, 0])  # the prefill is dense
    assert not torch.allclose(got[:, 1:], ref[:, 1:], atol=1e-3)


@pytest.mark.parametrize("family, method", CASES, ids=IDS)
def test_left_padded_batch_equals_single(family, method):
    model = family_model(family)
    seqs = [prompt(n, seed=20 + n)[0] for n in (45, 19)]
    ids, mask = left_pad(seqs)
    with hf.patched(model, method=method, **padded(method)):
        out = greedy(model, ids, n=6, attention_mask=mask, return_dict_in_generate=True)
        _check_layers(model, out.past_key_values)
        for i, layer in out.past_key_values.kvsparse_layers():
            assert layer.seq_lens.tolist() == [len(s) + 5 for s in seqs], i
        for i, s in enumerate(seqs):
            single = greedy(model, s[None], n=6)
            assert torch.equal(out.sequences[i, ids.shape[1]:], single[0, s.shape[0]:]), i


# ------------------------------------------------------------------ Gemma 3
def test_gemma3_is_supported_and_hybrid():
    assert {"Qwen3ForCausalLM", "Gemma3ForCausalLM", "Gemma3TextModel"} <= set(hf.supported_models())
    model = family_model("gemma3")
    assert sliding_layers(model.config) == (0, 2)  # the window (16) is shorter than the prompts
    assert sliding_layers(family_model("mistral").config) == ()  # a window on every layer (or none)
    attn = model.model.layers[1].self_attn
    assert attn.scaling != attn.head_dim ** -0.5  # query_pre_attn_scalar


def test_gemma3_static_cache_equals_unpatched():
    model = family_model("gemma3")
    ids = prompt(30)
    ref = greedy(model, ids, n=8)
    with hf.patched(model, method="quest", **lossless("quest", 256)):
        cache = hf.make_cache(model, batch_size=1, max_cache_len=48)
        _check_layers(model, cache)
        assert torch.equal(greedy(model, ids, n=8, **hf.cache_kwargs(model, cache), disable_compile=True), ref)


def _no_kernel_for_256(monkeypatch):
    """Simulate, on the CPU, a device whose kernels lack head_dim 256 (the
    device support check of kvsparse.hf)."""
    monkeypatch.setattr(hf, "_kernel_supports", lambda head_dim, device, method: int(head_dim) != 256)


@pytest.mark.parametrize("method", METHODS)
def test_head_dim_without_kernel_raises(method, monkeypatch):
    """A layer whose head dim has no kernel on its device: patch and
    make_cache raise IntegrationError naming the head dim, the layers, the
    device and the supported head dims (simulated on the CPU)."""
    model = family_model("gemma3")
    _no_kernel_for_256(monkeypatch)
    dims = ", ".join(map(str, hf.cuda_head_dims(method)[:-1])) + f" or {hf.cuda_head_dims(method)[-1]}"
    match = rf"{method} has no CUDA kernel for head_dim 256 on cpu: layers \[1\] .*head_dim {dims}.*fallback"
    with pytest.raises(_compat.IntegrationError, match=match):
        hf.patch(model, method=method, **small(method))
    assert not hf.is_patched(model)  # raised before any hook
    with pytest.raises(_compat.IntegrationError, match=match):
        hf.patch(model, method=method, self_check=False, **small(method))
    assert not hf.is_patched(model)
    with pytest.raises(_compat.IntegrationError, match=match):
        hf.make_cache(model, config=make_config(method, **small(method)))
    # a patched model (with the fallback) still refuses a cache of a config without it
    hf.patch(model, method=method, fallback="dense", self_check=False, **small(method))
    try:
        with pytest.raises(_compat.IntegrationError, match=match):
            hf.make_cache(model, config=model.kvsparse_config.replace(fallback=None))
    finally:
        hf.unpatch(model)


@pytest.mark.parametrize("method", METHODS)
def test_head_dim_without_kernel_falls_back_dense_with_warning(method, monkeypatch):
    """With fallback="dense", a head dim without a kernel on its device runs
    the full layers dense, with a warning naming the method and the head dim
    (simulated on the CPU)."""
    model = family_model("gemma3")
    ids = prompt(30)
    ref = greedy(model, ids, n=6)
    _no_kernel_for_256(monkeypatch)
    with pytest.warns(UserWarning, match=f"{method} has no CUDA kernel for head_dim 256"):
        hf.patch(model, method=method, fallback="dense", **small(method))
    assert model.kvsparse_config.fallback == "dense"
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = greedy(model, ids, n=6, return_dict_in_generate=True)
        assert any("head_dim 256" in str(x.message) for x in w)
        assert out.past_key_values.native_layers == {0, 1, 2}
        assert torch.equal(out.sequences, ref)
    finally:
        hf.unpatch(model)
    # a head dim with CUDA kernels: no warning, every layer the method's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf.make_cache(tiny_model(layers=1, head_dim=64), config=make_config(method)).native_layers == frozenset()


def test_fallback_field():
    for method in METHODS:
        assert make_config(method).fallback is None
        assert make_config(method, fallback="dense").to_dict()["fallback"] == "dense"
        with pytest.raises(ValueError, match="fallback"):
            make_config(method, fallback="sparse")


def test_cuda_head_dims_match_the_ops():
    from kvsparse import _ops

    assert hf.CUDA_HEAD_DIMS == _ops.CUDA_HEAD_DIMS == (64, 80, 96, 128, 256)
    assert hf.cuda_head_dims("quest") == hf.cuda_head_dims("sparq") == hf.CUDA_HEAD_DIMS
    # QAQ's attention on CUDA (check_qaq_attention_head_dim in csrc/ops/qaq.cpp) takes no 80
    assert hf.cuda_head_dims("qaq") == hf.cuda_head_dims("quest_qaq") == (64, 96, 128, 256)
    assert hf.cuda_head_dims(make_config("qaq")) == (64, 96, 128, 256)
    for method in METHODS:
        assert hf._kernel_supports(72, "cpu", method) and not hf._kernel_supports(72, "cuda", method)
        assert all(hf._kernel_supports(d, "cuda", method) for d in (64, 96, 128, 256))
    assert hf._kernel_supports(80, "cuda", "quest") and not hf._kernel_supports(80, "cuda", "qaq")
