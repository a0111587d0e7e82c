"""The passkey retrieval task: prompts with a 5-digit key hidden in filler text,
exact-match scoring, and the run over lengths, depths and trials."""
import dataclasses
import random
import re

from ..decoding import _decode, _encode, _eos_id, _tqdm, chat_split, greedy_answer
from ..runs import SharedPrefill, cache_memory, grid_key, method_applied, shard_items

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


def run_passkey(model, tok, runs, lengths, depths, trials, seed=0, fmt="plain",
                max_new_tokens=8, share_prefill=True, progress=True, variation=0.0,
                shard=(1, 1), previous=None, on_record=None):
    """Passkey retrieval for every run, length, depth and trial.

    With ``share_prefill`` the context is prefilled once per prompt by the dense
    model and its KV cache is copied into every run (converted into the method's
    cache when the method has its own, see :func:`_cache_from_dense`); the prefill is
    dense in every method, so this only saves time. Without it, every run prefills
    the context itself, under its method. The question and the answer are then
    decoded under the run's method.

    ``shard=(K, N)``: only every N-th prompt of the (length, depth, trial) grid,
    from the K-th (1-based). ``previous``: ``{key: record}`` of records already
    done (:func:`kvsparse.eval.runs.record_key`), reused instead of recomputed;
    a prompt whose runs are all done is not even built. ``on_record(record)``
    is called on every newly finished record (e.g. to append it to
    ``records.jsonl``). The progress bar counts only the records left to do.

    Returns a list of records (dicts), one per (run, length, depth, trial) of the
    shard, in grid order (reused ones included).
    """
    previous = previous or {}
    records = []
    eos = _eos_id(tok)
    prompts = shard_items([(L, d, t) for L in lengths for d in depths for t in range(trials)], shard)
    todo = sum(grid_key("passkey", run, L, d, t) not in previous for L, d, t in prompts for run in runs)
    bar = _tqdm(total=todo, desc="passkey", disable=not progress)
    for L, depth, t in prompts:
        keys = [grid_key("passkey", run, L, depth, t) for run in runs]
        if all(k in previous for k in keys):
            records.extend(previous[k] for k in keys)
            continue
        rng = random.Random(f"passkey-{seed}-{L}-{depth}-{t}")
        p = make_passkey_prompt(tok, L, depth, rng, fmt=fmt, variation=variation)
        shared = SharedPrefill(model, p.context_ids, enabled=share_prefill)
        for run, key in zip(runs, keys):
            if key in previous:
                records.append(previous[key])
                continue
            with method_applied(model, run):
                logits, cache, prefill_s = shared.get(run)
                new, steps, secs = greedy_answer(model, cache, p.question_ids, max_new_tokens,
                                                 eos, logits=logits)
            mem = cache_memory(cache)
            del cache
            answer = _decode(tok, new)
            rec = {
                "run": run.label, "method": run.method, "kwargs": dict(run.kwargs),
                "length": L, "prompt_tokens": p.length, "depth": depth, "trial": t,
                "needle_depth": round(p.needle_depth, 4), "key": p.key, "answer": answer,
                "correct": score_passkey(answer, p.key), "decode_steps": steps,
                "decode_s": secs, "prefill_s": prefill_s,
                "decode_tok_s": steps / secs if secs > 0 else float("nan"),
                **({"compression": mem["compression"], "memory": mem} if mem else {}),
            }
            records.append(rec)
            if on_record is not None:
                on_record(rec)
            bar.update(1)
            bar.set_postfix_str(f"L={L} d={depth:g} {run.label}: {answer.strip()[:12]!r}")
        del shared
    bar.close()
    return records
