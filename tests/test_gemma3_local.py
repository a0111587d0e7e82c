"""Gemma 3's sliding-window (local) layers under a patched model: a tiny
random-weight ``Gemma3ForCausalLM`` (CPU, nothing downloaded), six layers in
Gemma 3's pattern (five sliding-window layers, then one full-attention layer).

For every method, with the cache ``generate()`` makes and with
``kvsparse.make_cache`` (dynamic and static) passed in: the sliding layers
(``sliding_layers(config)``) are transformers' own cache layers whose keys
never hold more than the window, checked after every decode step; the
full-attention layer is a kvsparse layer holding every token of the context.
"""
import pytest
import torch

pytest.importorskip("transformers")

from transformers import LogitsProcessorList  # noqa: E402

import kvsparse  # noqa: E402
from kvsparse import _compat  # noqa: E402
from kvsparse.cache import KVCacheLayer  # noqa: E402
from kvsparse.geometry import sliding_layers  # noqa: E402

_CFG = _compat.find_classes("transformers.models.gemma3.configuration_gemma3", "Gemma3TextConfig")
_LM = _compat.find_classes("transformers.models.gemma3.modeling_gemma3", "Gemma3ForCausalLM")
pytestmark = pytest.mark.skipif(not (_CFG and _LM), reason="this transformers has no Gemma 3")

WINDOW = 16
LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention"]
SLIDING, FULL = (0, 1, 2, 3, 4), (5,)
VOCAB = 128
PROMPT, NEW, BATCH = 40, 6, 2
TOTAL = PROMPT + NEW - 1  # the last generated token is never fed back

METHODS = {
    "quest": dict(token_budget=16, page_size=8, dense_layers=0),  # a budget below the context
    "sparq": dict(compression=1 / 8, dense_below=0),
    "qaq": dict(sigma=0.05),
}
CACHES = ("generate", "dynamic", "static")


@pytest.fixture(scope="module")
def model():
    cfg = _CFG[0](
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=WINDOW, layer_types=LAYER_TYPES, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if list(getattr(cfg, "layer_types", None) or []) != LAYER_TYPES:
        pytest.skip(f"Gemma3TextConfig of transformers {_compat.transformers_version()} does not keep layer_types")
    torch.manual_seed(0)
    m = _LM[0](cfg).eval().requires_grad_(False)
    m.generation_config.eos_token_id = None
    return m


def _ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, VOCAB, (BATCH, PROMPT), generator=g)


def _check_sliding(cache, where):
    """The sliding layers: transformers' own cache layers, at most WINDOW keys."""
    for i in SLIDING:
        layer = cache.layers[i]
        assert not isinstance(layer, KVCacheLayer), (where, i, type(layer).__name__)
        assert type(layer).__module__.startswith("transformers."), (where, i, type(layer).__module__)
        assert layer.is_sliding, (where, i)
        n = layer.keys.shape[-2]  # [B, Hkv, tokens, D]
        assert n <= WINDOW, f"{where}: sliding layer {i} holds {n} keys, window {WINDOW}"


class _EveryStep:
    """A logits processor that checks the sliding layers of ``cache`` at each step."""

    def __init__(self, cache):
        self.cache, self.steps = cache, 0

    def __call__(self, input_ids, scores):
        _check_sliding(self.cache, f"step {self.steps} ({input_ids.shape[1]} tokens)")
        self.steps += 1
        return scores


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("method", list(METHODS))
def test_local_layers_stay_within_the_window(model, method, cache_kind):
    assert sliding_layers(model.config) == SLIDING
    ids = _ids()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
              pad_token_id=0, return_dict_in_generate=True)
    with kvsparse.patched(model, method=method, **METHODS[method]):
        clock = None
        if cache_kind != "generate":
            cache = kvsparse.make_cache(model, BATCH, PROMPT + NEW if cache_kind == "static" else None)
            assert cache.is_compileable == (cache_kind == "static")
            clock = _EveryStep(cache)
            kw.update(kvsparse.cache_kwargs(model, cache), logits_processor=LogitsProcessorList([clock]),
                      disable_compile=True)
        with torch.no_grad():
            out = model.generate(ids, **kw)
    assert out.sequences.shape == (BATCH, PROMPT + NEW)
    cache = kvsparse.output_cache(out)
    if clock is not None:
        assert cache is clock.cache and clock.steps == NEW
    assert cache.native_layers == frozenset(SLIDING)
    _check_sliding(cache, "after generate()")
    for i in SLIDING:
        # the window is full (the layers did see the tokens past it): 4.57 and 5.x
        # keep WINDOW - 1 keys in a dynamic layer, a static layer's buffer is WINDOW long
        assert cache.layers[i].keys.shape[-2] >= WINDOW - 1, i
    assert [i for i, _ in cache.kvsparse_layers()] == list(FULL)
    for i in FULL:
        layer = cache.layers[i]
        assert isinstance(layer, KVCacheLayer) and layer.method == method, (i, type(layer).__name__)
        assert layer.seq_lens.tolist() == [TOTAL] * BATCH, i
        assert layer.tokens_seen() == TOTAL and int(layer.get_seq_length()) == TOTAL, i
        assert layer.capacity >= TOTAL, i
        if layer.keys is not None:  # dense K/V storage (Quest, SparQ; QAQ keeps packed codes only)
            assert layer.keys.shape[-2] == layer.capacity > WINDOW, i


def test_report_names_the_local_layers(model):
    with kvsparse.patched(model, method="quest", **METHODS["quest"]):
        text = kvsparse.report(model)
    assert "layers 5 (1 of 6): the quest cache and decode" in text
    assert "layers 0-4: sliding-window layers, left to transformers' attention and cache layers" in text
    assert kvsparse.report(model) is None  # unpatched
