"""The perplexity task in decode mode: a real text scored token by token, one
decode step (q_len = 1, with the KV cache) per token, after a dense prefill."""
import math
import time

import torch

from ..decoding import _encode, _step, _tqdm, prefill
from ..runs import SharedPrefill, cache_memory, grid_key, method_applied, shard_items


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


def run_ppl(model, tok, runs, text, lengths, prefix=64, window=None, progress=True, share_prefill=True,
            shard=(1, 1), previous=None, on_record=None):
    """Decode-mode perplexity of ``text`` for every run.

    ``window=None`` (default): one pass per run: ``prefix`` tokens prefilled, then
    every token to ``max(lengths)`` decoded; ``ppl[L]`` scores tokens
    ``prefix .. L-1``. ``window=W``: one pass per length: ``L - W`` tokens prefilled
    (densely, shared by the runs), then the last ``W`` tokens decoded and scored.

    ``shard=(K, N)``: only every N-th length (from the K-th, 1-based; without a
    window the pass goes to the longest length of the shard). ``previous``:
    ``{key: per-length record}`` already done (:func:`kvsparse.eval.runs.record_key`),
    reused; a pass runs only as far as the longest length still missing.
    ``on_record(record)`` gets every new per-length record (one per run and
    length: ``ppl``, ``scored``, the ``token_nll`` of the scored tokens, and the
    ``pass`` it came from with that pass's timings).

    Returns one record per run (:func:`combine_ppl` of its per-length records).
    """
    ids = _encode(tok, text)
    lengths = sorted(set(int(x) for x in lengths))
    Lmax = lengths[-1]
    if len(ids) < Lmax:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the longest length {Lmax}")
    if window is not None and not 0 < window < lengths[0]:
        raise ValueError(f"window ({window}) must be in (0, shortest length {lengths[0]})")
    previous = previous or {}
    mine = shard_items(lengths, shard)
    need = {i: [L for L in mine if grid_key("ppl", run, L) not in previous] for i, run in enumerate(runs)}
    # passes: (tokens prefilled, {run index: the lengths the pass scores for that run})
    if window is None:
        passes = [(prefix, {i: Ls for i, Ls in need.items() if Ls})]
    else:
        passes = [(L - window, {i: [L] for i, Ls in need.items() if L in Ls}) for L in mine]
    passes = [(pfx, todo) for pfx, todo in passes if todo]
    bar = _tqdm(total=sum(max(Ls) - pfx - 1 for pfx, todo in passes for Ls in todo.values()), desc="ppl",
                unit="tok", disable=not progress)
    new = {}
    for pfx, todo in passes:
        shared = SharedPrefill(model, ids[:pfx], enabled=share_prefill)
        for i, Ls in todo.items():
            run = runs[i]
            end = max(Ls)
            bar.set_postfix_str(f"{run.label} to {end}")
            with method_applied(model, run):
                logits, cache, prefill_s = shared.get(run)
                ppl, nll, steps, secs = decode_nll(model, ids, pfx, Ls, progress=bar, prefilled=(logits, cache))
            mem = cache_memory(cache)  # at the end of the pass (the cache is updated in place)
            del cache
            for L in Ls:
                rec = {"run": run.label, "method": run.method, "kwargs": dict(run.kwargs), "length": L,
                       "ppl": ppl[L], "scored": [pfx, L], "pass": [pfx, end],
                       "token_nll": [round(x, 5) for x in nll[:L - pfx]],
                       "decode_steps": steps, "decode_s": secs, "prefill_s": prefill_s,
                       **({"compression": mem["compression"], "memory": mem} if mem and L == end else {})}
                new[grid_key("ppl", run, L)] = rec
                if on_record is not None:
                    on_record(rec)
        del shared
    bar.close()
    per_length = []
    for run in runs:
        for L in mine:
            k = grid_key("ppl", run, L)
            per_length.append(new[k] if k in new else previous[k])
    return combine_ppl(per_length)


def combine_ppl(records):
    """Per-length perplexity records (:func:`run_ppl`'s ``on_record``) as one record
    per run: ``ppl`` / ``scored`` / ``compression`` / ``memory`` keyed by length (as
    a string), ``token_nll`` keyed by pass (``"prefill-end"``), the timings summed
    over the distinct passes, and ``decode_tok_s``."""
    out, seen = {}, set()
    for r in records:
        y = out.setdefault(r["run"], {"run": r["run"], "method": r["method"], "kwargs": dict(r["kwargs"]),
                                      "ppl": {}, "scored": {}, "decode_steps": 0, "decode_s": 0.0,
                                      "prefill_s": 0.0, "token_nll": {}})
        L = str(r["length"])
        y["ppl"][L] = r["ppl"]
        y["scored"][L] = list(r["scored"])
        pas = f"{r['pass'][0]}-{r['pass'][1]}"
        if len(r["token_nll"]) > len(y["token_nll"].get(pas, ())):
            y["token_nll"][pas] = r["token_nll"]
        if (r["run"], pas) not in seen:
            seen.add((r["run"], pas))
            for k in ("decode_steps", "decode_s", "prefill_s"):
                y[k] += r[k]
        if "compression" in r:
            y.setdefault("compression", {})[str(r["pass"][1])] = r["compression"]
            y.setdefault("memory", {})[str(r["pass"][1])] = r["memory"]
    for y in out.values():
        y["decode_tok_s"] = y["decode_steps"] / y["decode_s"] if y["decode_s"] > 0 else float("nan")
    return list(out.values())
