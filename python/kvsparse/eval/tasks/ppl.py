"""The perplexity task in decode mode: a real text scored token by token, one
decode step (q_len = 1, with the KV cache) per token, after a dense prefill."""
import math
import time

import torch

from ..decoding import _encode, _step, _tqdm, prefill
from ..runs import SharedPrefill, cache_memory, method_applied


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
