"""A RULER-style synthetic long-context suite, generated offline (``--task ruler``).

Seven tasks in the spirit of RULER (Hsieh et al., 2024), each sample built from
a seeded ``random.Random`` (nothing is downloaded) at a target prompt length
in tokens of the model's own tokenizer:

================  ===========================================================
niah_single       one "special magic number" for a key, hidden in filler
niah_multikey     the same, beside three needles with other keys
niah_multivalue   four numbers for the same key: all four are asked for
niah_multiquery   four needles with different keys: two of them are asked for
vt                variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR
                  A``, ... spread through filler; every name holding the value
                  is asked for
cwe               common-words extraction: a numbered word list in which ten
                  words repeat far more than the rest; the ten are asked for
fwe               frequent-words extraction: coded words drawn from a Zipf
                  law; the three most frequent are asked for
================  ===========================================================

A sample's score is the percentage of its expected answers found in the
generated text (case-insensitive substring match, RULER's "all" metric).

Two question placements are measured, since they test different things:

* ``prompt``: the question (and the answer prefix) is part of the prompt,
  which is prefilled with dense attention as every method does; only the
  answer is decoded under the method. This is the usual RULER setting: the
  question's tokens saw the whole context densely.
* ``decoded``: the context is prefilled, then the question's tokens are fed one
  by one as decode steps under the method, then the answer: the method must
  find the needle from the question's own decode-time queries.

Words are pseudo-words built from syllables (``kabo``, ``demitu``), so the
suite needs no word list and no data file.
"""
import dataclasses
import random

from ..decoding import _decode, _encode, _eos_id, _tqdm, chat_split, greedy_answer
from ..runs import SharedPrefill, cache_memory, compression_ratio, grid_key, method_applied, shard_items

__all__ = ["TASKS", "RulerSample", "make_sample", "score", "run_ruler"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")

#: answer tokens decoded per task
MAX_NEW_TOKENS = {"niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40, "niah_multiquery": 24,
                  "vt": 30, "cwe": 60, "fwe": 20}

_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
_CONS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclasses.dataclass
class RulerSample:
    """One prompt: ``context_ids`` (always prefilled), ``question_ids`` (the
    question and the answer prefix) and the expected ``answers``."""

    task: str
    length: int
    context_ids: list
    question_ids: list
    answers: list
    max_new_tokens: int

    @property
    def prompt_tokens(self):
        return len(self.context_ids) + len(self.question_ids)


def _word(rng, syllables):
    return "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(syllables))


def _distinct_words(rng, n, syllables=(2, 3)):
    out, seen = [], set()
    while len(out) < n:
        w = _word(rng, rng.choice(syllables))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _number(rng, exclude=()):
    while True:
        v = str(rng.randint(1000000, 9999999))
        if v not in exclude:
            return v


def _fill(tok, units, budget):
    """The longest prefix of the (endless) ``units`` iterator whose ``" unit"``
    tokens fit in ``budget``."""
    out, used = [], 0
    for u in units:
        n = len(_encode(tok, " " + u))
        if used + n > budget:
            break
        out.append(u)
        used += n
    return out


def _noise():
    i = 0
    while True:
        yield _NOISE[i % len(_NOISE)]
        i += 1


def _insert(units, items, rng):
    """``units`` with each of ``items`` inserted at a random depth (in order)."""
    pos = sorted(rng.randint(0, len(units)) for _ in items)
    out, last = [], 0
    for p, item in zip(pos, items):
        out.extend(units[last:p])
        out.append(item)
        last = p
    out.extend(units[last:])
    return out


def _wrap(tok, fmt, instruction, body, question, prefix):
    """(context text, question text) in the prompt format."""
    if fmt == "plain":
        return instruction + "\n\n" + body + "\n\n", question + " " + prefix
    if fmt == "chat":
        head, tail = chat_split(tok, instruction + "\n\n" + body + "\n\n", "")
        return head, question + tail + prefix
    raise ValueError(f"unknown prompt format {fmt!r} (plain or chat)")


def make_sample(tok, task, length, rng, fmt="plain"):
    """One sample of ``task`` of about ``length`` prompt tokens (within a
    filler unit or so; the real count is :attr:`RulerSample.prompt_tokens`)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; one of {TASKS}")
    length = int(length)
    if task.startswith("niah"):
        keys = _distinct_words(rng, 4)
        instruction = ("Some special magic numbers are hidden in the text below. Memorize them: "
                       "you will be asked about them.")
        if task == "niah_multivalue":
            vals = []
            for _ in range(4):
                vals.append(_number(rng, vals))
            needles = [f"The special magic number for {keys[0]} is {v}." for v in vals]
            answers = vals
            question = f"What are all the special magic numbers for {keys[0]} in the text?"
            prefix = f"The special magic numbers for {keys[0]} are"
        else:
            n = 1 if task == "niah_single" else 4
            vals = []
            for _ in range(n):
                vals.append(_number(rng, vals))
            needles = [f"The special magic number for {k} is {v}." for k, v in zip(keys, vals)]
            if task == "niah_multiquery":
                asked = [0, 1 + rng.randrange(3)]
                question = (f"What are the special magic numbers for {keys[asked[0]]} and "
                            f"{keys[asked[1]]} in the text?")
                prefix = f"The special magic numbers for {keys[asked[0]]} and {keys[asked[1]]} are"
                answers = [vals[i] for i in asked]
            else:
                question = f"What is the special magic number for {keys[0]} in the text?"
                prefix = f"The special magic number for {keys[0]} is"
                answers = [vals[0]]
            rng.shuffle(needles)
        units_fn, items = _noise, needles
    elif task == "vt":
        value = _number(rng)
        names = []
        while len(names) < 5:
            v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if v not in names:
                names.append(v)
        items = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        instruction = "Memorize the variable assignments in the text below and follow them."
        question = f"Which variables are assigned the value {value}, directly or through other variables?"
        prefix = f"The variables assigned the value {value} are:"
        answers = names
        units_fn = _noise
    elif task == "cwe":
        instruction = "Below is a numbered list of words. Some words appear many times."
        question = "What are the 10 most common words in the list above?"
        prefix = "The 10 most common words in the list are:"
        return _list_sample(tok, task, length, rng, fmt, instruction, question, prefix)
    else:  # fwe
        instruction = ("Read the coded text below and keep track of how often each coded word appears.")
        question = "What are the 3 most frequent coded words in the text above?"
        prefix = "The 3 most frequent coded words are:"
        return _list_sample(tok, task, length, rng, fmt, instruction, question, prefix)
    return _assemble(tok, task, length, rng, fmt, instruction, question, prefix, units_fn, items, answers)


def _assemble(tok, task, length, rng, fmt, instruction, question, prefix, units_fn, items, answers):
    ctx, q = _wrap(tok, fmt, instruction, "", question, prefix)
    fixed = len(_encode(tok, ctx)) + len(_encode(tok, q)) + sum(len(_encode(tok, " " + i)) for i in items)
    units = _fill(tok, units_fn(), max(length - fixed, 0))
    body = " ".join(_insert(units, items, rng))
    ctx, q = _wrap(tok, fmt, instruction, body, question, prefix)
    return RulerSample(task, length, _encode(tok, ctx), _encode(tok, q), list(answers), MAX_NEW_TOKENS[task])


def _list_sample(tok, task, length, rng, fmt, instruction, question, prefix):
    ctx, q = _wrap(tok, fmt, instruction, "", question, prefix)
    budget = max(length - len(_encode(tok, ctx)) - len(_encode(tok, q)), 0)
    if task == "cwe":
        probe = _distinct_words(random.Random(0), 20)
        per = len(_encode(tok, " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(probe)))) / len(probe)
        n_items = max(int(budget / per), 40)
        f_common = max(4, min(30, n_items // 40))  # repeats of each of the 10 common words
        n_rare = max((n_items - 10 * f_common) // 3, 1)  # the rest: words seen 3 times
        words = _distinct_words(rng, 10 + 2 * n_rare)
        order_seed = rng.random()
        for _ in range(6):  # size the rare words to the budget (the common ones keep their counts)
            seq = words[:10] * f_common + words[10:10 + n_rare] * 3
            random.Random(order_seed).shuffle(seq)
            units = [f"{i + 1}. {w}" for i, w in enumerate(seq)]
            used = len(_encode(tok, " " + " ".join(units)))
            step = int((budget - used) / (3 * per))
            if step == 0 or (step > 0 and n_rare + step > len(words) - 10):
                break
            n_rare = max(n_rare + step, 1)
        units = _fill(tok, iter(units), budget)
        counts = {}
        for u in units:
            w = u.split(". ", 1)[1]
            counts[w] = counts.get(w, 0) + 1
        answers = sorted(counts, key=lambda w: -counts[w])[:10]
        body = " ".join(units)
    else:
        vocab = _distinct_words(rng, 200, syllables=(2,))
        weights = [1.0 / (k + 1) ** 2 for k in range(len(vocab))]
        probe = " ".join(vocab[:20])
        per = len(_encode(tok, " " + probe)) / 20
        n = max(int(2 * budget / per), 30)  # cut to the budget below
        seq = rng.choices(vocab, weights=weights, k=n)
        units = _fill(tok, iter(seq), budget)
        counts = {}
        for w in units:
            counts[w] = counts.get(w, 0) + 1
        ranked = sorted(counts, key=lambda w: (-counts[w], vocab.index(w)))
        answers = ranked[:3]
        body = " ".join(units)
    ctx, q = _wrap(tok, fmt, instruction, body, question, prefix)
    return RulerSample(task, length, _encode(tok, ctx), _encode(tok, q), answers, MAX_NEW_TOKENS[task])


def score(output, answers):
    """Percentage of ``answers`` found in ``output`` (case-insensitive)."""
    if not answers:
        raise ValueError("score needs at least one expected answer")
    low = output.lower()
    return 100.0 * sum(a.lower() in low for a in answers) / len(answers)


def run_ruler(model, tok, runs, tasks, lengths, samples, seed=0, fmt="plain", placements=("prompt", "decoded"),
              share_prefill=True, progress=True, shard=(1, 1), previous=None, on_record=None):
    """Every run on every (task, length, sample, question placement).

    ``shard=(K, N)``: only every N-th sample of the (task, length, sample) grid,
    from the K-th (1-based; both placements of a sample stay together).
    ``previous``: ``{key: record}`` of records already done
    (:func:`kvsparse.eval.runs.record_key`), reused instead of recomputed.
    ``on_record(record)`` is called on every newly finished record. The progress
    bar counts only the records left to do.

    Returns a list of records (dicts) with the generated answer and its score, in
    grid order (reused ones included).
    """
    for p in placements:
        if p not in ("prompt", "decoded"):
            raise ValueError(f"unknown question placement {p!r} (prompt or decoded)")
    previous = previous or {}
    records = []
    eos = _eos_id(tok)
    items = shard_items([(task, L, i) for task in tasks for L in lengths for i in range(samples)], shard)
    todo = sum(grid_key("ruler", run, task, L, i, place) not in previous
               for task, L, i in items for place in placements for run in runs)
    bar = _tqdm(total=todo, desc="ruler", disable=not progress)
    for task, L, i in items:
        keys = {place: [grid_key("ruler", run, task, L, i, place) for run in runs] for place in placements}
        if all(k in previous for ks in keys.values() for k in ks):
            records.extend(previous[k] for place in placements for k in keys[place])
            continue
        s = make_sample(tok, task, L, random.Random(f"ruler-{seed}-{task}-{L}-{i}"), fmt=fmt)
        for place in placements:
            if all(k in previous for k in keys[place]):
                records.extend(previous[k] for k in keys[place])
                continue
            pre = s.context_ids + (s.question_ids if place == "prompt" else [])
            q = [] if place == "prompt" else s.question_ids
            shared = SharedPrefill(model, pre, enabled=share_prefill)
            for run, key in zip(runs, keys[place]):
                if key in previous:
                    records.append(previous[key])
                    continue
                with method_applied(model, run):
                    logits, cache, _ = shared.get(run)
                    new, steps, secs = greedy_answer(model, cache, q, s.max_new_tokens, eos, logits=logits)
                mem = cache_memory(cache)
                del cache
                out = _decode(tok, new)
                rec = {
                    "task": task, "length": L, "prompt_tokens": s.prompt_tokens, "sample": i,
                    "question": place, "run": run.label, "method": run.method,
                    "kwargs": dict(run.kwargs), "answers": s.answers, "output": out,
                    "score": score(out, s.answers), "decode_steps": steps, "decode_s": secs,
                    "compression_ratio": compression_ratio(run, L, mem),
                }
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
                bar.update(1)
                bar.set_postfix_str(f"{task} L={L} {place} {run.label}")
            del shared
    bar.close()
    return records
