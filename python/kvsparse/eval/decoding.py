"""Tokens in and out of a model with a KV cache, shared by every task: tokenizer
helpers, the chat-template split, chunked prefill, greedy decoding one token per
step, and the progress bar."""
import sys
import time

import torch

from .. import _compat


def _tqdm(**kw):
    """A tqdm progress bar on stderr (tqdm comes with transformers)."""
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


def _encode(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=True)


def _eos_id(tok):
    e = getattr(tok, "eos_token_id", None)
    return e if isinstance(e, int) else None


def chat_split(tok, before, after):
    """The tokenizer's chat template around one user message ``before + X +
    after``, split at ``X``: ``(head, tail)`` (the generation prompt ends ``tail``)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
    marker = "\x00SPLIT\x00"
    text = tok.apply_chat_template([{"role": "user", "content": before + marker + after}],
                                   tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    return head, tail


def _step(model, ids, cache):
    """One forward of ``ids`` ([T] list or [1, T] tensor) with the cache; last logits [V] float32."""
    if not torch.is_tensor(ids):
        ids = torch.tensor([ids], dtype=torch.long)
    ids = ids.to(model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **_compat.model_cache_kwargs(model, cache))
    return out.logits[0, -1].float(), _compat.output_cache(out)


@torch.inference_mode()
def prefill(model, ids, cache=None, chunk=2048):
    """Prefill ``ids`` (list of ints) in chunks; returns ``(last_logits, cache)``.
    ``cache=None``: a new one, the method's cache when ``model`` is patched
    (a patched model refuses to decode over a plain ``DynamicCache``)."""
    from transformers import DynamicCache

    from .. import hf

    if cache is None:
        cache = hf.make_cache(model) if hf.is_patched(model) else DynamicCache(config=model.config)
    logits = None
    for s in range(0, len(ids), chunk):
        logits, cache = _step(model, ids[s:s + chunk], cache)
    return logits, cache


@torch.inference_mode()
def greedy_answer(model, cache, question_ids, max_new_tokens=8, eos_token_id=None, logits=None):
    """Feed ``question_ids`` one token at a time, then generate greedily.

    Returns ``(new_token_ids, decode_steps, seconds)``: all forward passes here are
    decode steps (q_len = 1). When ``question_ids`` is empty the first answer token
    comes from ``logits`` (the prefill's last logits).
    """
    t0 = time.perf_counter()
    steps = 0
    for tid in question_ids:
        logits, cache = _step(model, [tid], cache)
        steps += 1
    if logits is None:
        raise ValueError("greedy_answer needs question_ids or the prefill logits")
    new = []
    for i in range(max_new_tokens):
        nxt = int(torch.argmax(logits))
        new.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        if i + 1 < max_new_tokens:
            logits, cache = _step(model, [nxt], cache)
            steps += 1
    return new, steps, time.perf_counter() - t0
