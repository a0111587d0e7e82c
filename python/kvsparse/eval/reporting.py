"""Reporting: markdown tables, figures and ``results.json`` / ``ruler.json`` of
an evaluation, and the merge of several result folders."""
import json
import math
import os
import platform

import torch

from .runs import MethodRun
from .tasks.ruler import TASKS


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------ 95% confidence intervals

Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile."""

# Student t's 97.5% quantile for 1..30 degrees of freedom (the usual table, to 3 decimals)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df):
    """Student t's 97.5% quantile with ``df`` degrees of freedom: the table to 30,
    then the Cornish-Fisher expansion around the normal quantile (within 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[int(df) - 1]
    z = Z95
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def wilson_interval(k, n, z=Z95):
    """The Wilson score interval of a binomial proportion ``k / n`` (95% by default),
    as ``(low, high)`` in [0, 1]; ``(nan, nan)`` when ``n == 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _mean_sd(xs):
    """``(n, mean, sample standard deviation)`` of ``xs``; the mean is NaN
    for no values, the deviation None for fewer than two."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return 0, float("nan"), None
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return n, m, sd


def mean_interval(xs, low=None, high=None):
    """``(mean, (lo, hi))``: the Student-t 95% interval of the mean of ``xs``
    (``n - 1`` degrees of freedom), clipped to ``[low, high]`` when given; the
    interval is None for fewer than two values."""
    n, m, sd = _mean_sd(xs)
    if n < 2:
        return m, None
    h = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = m - h, m + h
    if low is not None:
        lo = max(lo, low)
    if high is not None:
        hi = min(hi, high)
    return m, (lo, hi)


def ppl_interval(nll):
    """``(ppl, (lo, hi))`` from per-token NLLs: ``exp`` of the mean NLL and of a
    normal 95% interval of that mean (per token: it ignores the correlation
    between neighbouring tokens, so it is narrower than the truth)."""
    n, m, sd = _mean_sd(nll)
    if n == 0:
        return float("nan"), None
    if n < 2:
        return math.exp(m), None
    h = Z95 * sd / math.sqrt(n)
    return math.exp(m), (math.exp(m - h), math.exp(m + h))


def _pct_ci(p, ci):
    """``"80% [49, 94]"`` from a fraction and its interval."""
    if ci is None or any(math.isnan(c) for c in ci):
        return f"{100 * p:.0f}%"
    return f"{100 * p:.0f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _score_ci(m, ci, digits=0):
    return f"{m:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def passkey_summary(records, runs, lengths):
    """Accuracy with its 95% Wilson interval per (run, length) and per run (``length: "all"``)."""
    out = []
    for lab in [r.label for r in runs]:
        rs = [r for r in records if r["run"] == lab]
        for L in list(lengths) + ["all"]:
            x = [bool(r["correct"]) for r in rs if L == "all" or r["length"] == L]
            if not x:
                continue
            lo, hi = wilson_interval(sum(x), len(x))
            out.append({"run": lab, "length": L, "correct": sum(x), "prompts": len(x),
                        "accuracy": sum(x) / len(x), "ci95": [lo, hi]})
    return out


def ruler_summary(records):
    """Mean RULER score with a 95% Student-t interval over the per-sample scores
    (every task's samples pooled) per (run, placement, length) and per (run,
    placement) (``length: "all"``)."""
    out = []
    runs = list(dict.fromkeys(r["run"] for r in records))
    places = [p for p in ("prompt", "decoded") if any(r["question"] == p for r in records)]
    lengths = sorted({r["length"] for r in records})
    for run in runs:
        for place in places:
            rs = [r for r in records if r["run"] == run and r["question"] == place]
            for L in lengths + ["all"]:
                x = [r["score"] for r in rs if L == "all" or r["length"] == L]
                if not x:
                    continue
                m, ci = mean_interval(x, 0.0, 100.0)
                out.append({"run": run, "question": place, "length": L, "samples": len(x), "score": m,
                            "ci95": list(ci) if ci else None})
    return out


def ppl_intervals(rec):
    """``{length: [lo, hi]}``: the per-token 95% perplexity interval (:func:`ppl_interval`)
    of each length of a (per-run) perplexity record, from its ``token_nll``."""
    out = {}
    for L, (pfx, end) in rec.get("scored", {}).items():
        for pas, nll in rec.get("token_nll", {}).items():
            a, b = (int(x) for x in pas.split("-"))
            if a == pfx and b >= end and len(nll) >= end - pfx:
                _, ci = ppl_interval(nll[:end - pfx])
                if ci:
                    out[L] = list(ci)
                break
    return out


def passkey_tables(records, runs, lengths, depths):
    """Markdown: accuracy per run x length with its 95% Wilson interval (+ decode
    tok/s), and per run x (length, depth)."""
    labels = [r.label for r in runs]
    with_mem = any("compression" in r for r in records)
    lines = ["| method | " + " | ".join(f"{L} tok" for L in lengths) + " | all | decode tok/s |"
             + (" measured compression |" if with_mem else ""),
             "|---|" + "---:|" * (len(lengths) + 2 + with_mem)]
    for lab in labels:
        rs = [r for r in records if r["run"] == lab]
        cells = []
        for L in lengths:
            x = [bool(r["correct"]) for r in rs if r["length"] == L]
            cells.append(f"{_pct_ci(_mean(x), wilson_interval(sum(x), len(x)))} ({sum(x)}/{len(x)})" if x else "-")
        allx = [bool(r["correct"]) for r in rs]
        tps = _mean(r["decode_tok_s"] for r in rs)
        alls = _pct_ci(_mean(allx), wilson_interval(sum(allx), len(allx))) if allx else "-"
        row = f"| {lab} | " + " | ".join(cells) + f" | {alls} | {tps:.1f} |"
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
    """Markdown: perplexity per run x length with its per-token 95% interval
    (:func:`ppl_intervals`; + decode tok/s); when a run measured
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
        cis = ppl_intervals(r)
        cells = [(f"{r['ppl'][str(L)]:.3f}" + (f" [{cis[str(L)][0]:.2f}, {cis[str(L)][1]:.2f}]"
                                                 if str(L) in cis else "")) if str(L) in r["ppl"] else "-"
                 for L in lengths]
        row = f"| {r['run']} | " + " | ".join(cells) + f" | {r['decode_tok_s']:.1f} |"
        if with_mem:
            comp = r.get("compression") or {}
            row += " " + " | ".join(f"{comp[str(L)]:.2f}x" if str(L) in comp else "-" for L in lengths) + " |"
        lines.append(row)
    return "\n".join(lines)


def _round_ci(ci, digits=2):
    return [round(ci[0], digits), round(ci[1], digits)] if ci else None


def ruler_rows(records, model_name):
    """Mean scores in the kvpress leaderboard's RULER layout: one row per
    (dataset, model, method, press parameters, compression_ratio, task,
    context_length, question placement) with ``score`` in percent (and
    ``score_ci95``, the Student-t 95% interval over its samples, None for one sample)."""
    groups = {}
    for r in records:
        key = (r["run"], r["method"], r["task"], r["length"], r["question"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (label, method, task, L, place), rs in groups.items():
        rows.append({
            "dataset": "ruler", "data_dir": str(L), "model": model_name, "method": method, "press": label,
            "press_kwargs": rs[0]["kwargs"], "compression_ratio": round(sum(r["compression_ratio"] for r in rs) / len(rs), 4),
            "task": task, "context_length": L, "question": place,
            "score": round(sum(r["score"] for r in rs) / len(rs), 2), "samples": len(rs),
            "score_ci95": _round_ci(mean_interval([r["score"] for r in rs], 0.0, 100.0)[1]),
        })
    return rows


def ruler_table(rows, placement, summary=None):
    """A markdown table (runs x tasks, averaged over lengths; plus one column per
    length averaged over tasks) for one question placement. With ``summary``
    (:func:`ruler_summary`) the length and mean columns are its per-sample means
    with their 95% intervals."""
    rows = [r for r in rows if r["question"] == placement]
    summ = {(s["run"], s["length"]): s for s in (summary or []) if s["question"] == placement}
    if not rows:
        return ""
    runs = list(dict.fromkeys(r["press"] for r in rows))
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    lengths = sorted({r["context_length"] for r in rows})

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    head = ["run"] + tasks + [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in lengths] + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        rr = [r for r in rows if r["press"] == run]
        cells = [run]
        cells += [f"{mean([r['score'] for r in rr if r['task'] == t]):.0f}" for t in tasks]
        for L in lengths:
            sm = summ.get((run, L))
            cells.append(_score_ci(sm["score"], sm["ci95"]) if sm else
                         f"{mean([r['score'] for r in rr if r['context_length'] == L]):.0f}")
        sm = summ.get((run, "all"))
        cells.append(_score_ci(sm["score"], sm["ci95"], 1) if sm else f"{mean([r['score'] for r in rr]):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ruler_plot(path, rows, title, summary=None):
    """Mean score against context length, one line per run, a panel per question
    placement; with ``summary`` (:func:`ruler_summary`) its means and 95% intervals
    as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    places = [p for p in ("prompt", "decoded") if any(r["question"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(places), figsize=(6 * len(places), 4), squeeze=False)
    for ax, place in zip(axes[0], places):
        rr = [r for r in rows if r["question"] == place]
        names = list(dict.fromkeys(r["press"] for r in rr))
        for j, run in enumerate(names):
            dodge = 2 ** (0.04 * (j - (len(names) - 1) / 2))  # side by side, so that the error bars show
            lengths = sorted({r["context_length"] for r in rr if r["press"] == run})
            summ = {s["length"]: s for s in (summary or []) if s["run"] == run and s["question"] == place}
            ys, lo, hi = [], [], []
            for L in lengths:
                xs = [r["score"] for r in rr if r["press"] == run and r["context_length"] == L]
                sm = summ.get(L)
                y = sm["score"] if sm else sum(xs) / len(xs)
                ci = sm["ci95"] if sm and sm["ci95"] else (y, y)
                ys.append(y)
                lo.append(y - ci[0])
                hi.append(ci[1] - y)
            ax.errorbar([L * dodge for L in lengths], ys, yerr=[lo, hi], marker="o", capsize=3, label=run)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("RULER score (%)")
        ax.set_ylim(-5, 105)
        ax.set_title(f"question {'in the prompt' if place == 'prompt' else 'decoded under the method'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title, fontsize=9, dpi=110)


def make_plot(path, passkey_records, ppl_records, runs, pk_lengths, ppl_lengths, title):
    """PNG: passkey accuracy vs budget and perplexity vs budget (dense dashed), with
    95% intervals as error bars (Wilson for passkey, per-token for perplexity;
    dense: a shaded band)."""
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
            # val(label): (value, low, high) with the 95% interval, or None
            if kind == "passkey":
                def val(lab, L=L):
                    x = [bool(r["correct"]) for r in recs if r["run"] == lab and r["length"] == L]
                    if not x:
                        return None
                    lo, hi = wilson_interval(sum(x), len(x))
                    return 100 * _mean(x), 100 * lo, 100 * hi
            else:
                def val(lab, L=L):
                    x = [r for r in recs if r["run"] == lab and str(L) in r["ppl"]]
                    if not x:
                        return None
                    v = x[0]["ppl"][str(L)]
                    ci = ppl_intervals(x[0]).get(str(L)) or (v, v)
                    return v, ci[0], ci[1]
            for m in methods:
                pts = [(r.budget, val(r.label)) for r in sparse if r.method == m and r.budget]
                pts = [p for p in pts if p[1] is not None]
                if pts:
                    marker = "o" if len(methods) == 1 else "os^v"[methods.index(m) % 4]
                    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                                yerr=[[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]],
                                marker=marker, color=c, capsize=3, label=f"{m}, {L} tok")
            d = val("dense")
            if d is not None:
                ax.axhline(d[0], color=c, linestyle="--", linewidth=1, label=f"dense, {L} tok")
                if d[2] > d[1]:
                    ax.axhspan(d[1], d[2], color=c, alpha=0.08, linewidth=0)
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

    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvsparse": __version__}


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
    if result.get("shard"):
        md[-1:-1] = [f"- shard {result['shard']}: every {result['shard'].split('/')[1]}-th prompt of the grid "
                     "(merge the shards' folders with `--merge`)"]
    rec_info = result.get("records_file")
    if rec_info:
        md[-1:-1] = [f"- records: `records.jsonl`, {rec_info['reused']} reused from an earlier run (--resume), "
                     f"{rec_info['new']} computed by this one"]
    if pk:
        pk["summary"] = passkey_summary(pk["records"], runs, pk["lengths"])
        summary, detail, note = passkey_tables(pk["records"], runs, pk["lengths"], pk["depths"])
        md += ["## Passkey retrieval", "",
               f"Exact match of the 5-digit key; {pk['trials']} prompt(s) per length x depth, depths "
               f"{', '.join(f'{d:g}' for d in pk['depths'])} (0 = start of the filler, 1 = end); prompt "
               f"format {pk.get('prompt_format', 'plain')}. The context is prefilled densely; the question "
               "('What is the pass key? The pass key is') and the answer are decoded one token at a time "
               "with the method. Decode tok/s counts those decode steps. Accuracy with its 95% Wilson score "
               "interval in brackets (the prompts counted as independent trials).", "",
               summary, "", note, "", "Per length @ depth (correct / prompts):", "", detail, ""]
    if pp:
        name = os.path.basename(pp["text"])
        if pp.get("window"):
            how = (f"for each length L, the first L - {pp['window']} tokens are prefilled densely and the last "
                   f"{pp['window']} tokens are fed one per decode step (q_len = 1) and scored")
        else:
            how = (f"a {pp['prefix']}-token dense prefill, then every following token fed as one decode step "
                   f"(q_len = 1); ppl @ L scores tokens {pp['prefix']}..L-1")
        for r in pp["records"]:
            r["ppl_ci95"] = ppl_intervals(r)
        md += ["## Perplexity, decode mode", "", f"Text: {name}; {how}. In brackets: exp of a normal 95% "
               "interval of the mean NLL over the scored tokens; per token, so it ignores the correlation "
               "between neighbouring tokens (the true interval is wider).", "",
               ppl_table(pp["records"], pp["lengths"]), ""]
    rl = result.get("ruler")
    if rl:
        rows = ruler_rows(rl["records"], result["model"])
        rl["summary"] = rsum = ruler_summary(rl["records"])
        with open(os.path.join(out, "ruler.json"), "w") as f:
            json.dump(rows, f, indent=1)
        md += ["## RULER-style suite (kvsparse.ruler)", "",
               f"Score = % of the expected answers in the generated text; {rl['samples']} sample(s) per task and "
               f"length; prompt format {rl.get('prompt_format', 'plain')}. Columns: tasks (mean over lengths), "
               "then lengths (mean over tasks) and the mean over everything, each of these last with a 95% "
               "Student-t interval in brackets: over the per-sample scores of every task at that length (or "
               "at every length), pooled, n - 1 degrees of freedom, clipped to [0, 100]; none for a single "
               "sample. `ruler.json` has the rows in the kvpress leaderboard layout "
               "(task, context_length, method, compression_ratio, score, and score_ci95 over the row's "
               "samples); results.json's `ruler.summary` has the intervals of the tables.", ""]
        for place, what in (("prompt", "Question in the prompt (prefilled densely; the answer decoded under "
                                       "the method)"),
                            ("decoded", "Question decoded under the method (token by token after the context)")):
            table = ruler_table(rows, place, rsum)
            if table:
                md += [f"### {what}", "", table, ""]
        rplot = ruler_plot(os.path.join(out, "ruler.png"), rows, f"{result['model']}: RULER-style suite "
                           "(95% t-intervals)", rsum)
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


def _dedupe(kind, records):
    """``records`` with each key (:func:`kvsparse.eval.runs.record_key`) once (the first)."""
    from .runs import record_key

    seen, out = set(), []
    for r in records:
        k = record_key(kind, r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def _grid_order(kind, records, labels, r_tasks=()):
    """``records`` sorted as an unsharded run makes them (prompt by prompt, the runs in order)."""
    ri = {lab: i for i, lab in enumerate(labels)}
    if kind == "passkey":
        key = lambda r: (r["length"], r["depth"], r["trial"], ri.get(r["run"], len(ri)))  # noqa: E731
    else:
        ti = {t: i for i, t in enumerate(r_tasks)}
        key = lambda r: (ti.get(r["task"], len(ti)), r["length"], r["sample"],  # noqa: E731
                         r["question"] != "prompt", ri.get(r["run"], len(ri)))
    return sorted(records, key=key)


def merge_results(paths, out):
    """Combine the results.json of several runs (e.g. passkey and ppl run in parallel,
    or the shards of one grid, ``--shard K/N``): the records of each task are pooled
    (each key once), the report and its intervals are recomputed, and the folders'
    ``records.jsonl`` are concatenated into ``out/records.jsonl``."""
    from .runs import merge_record_files

    results, dirs = [], []
    for p in paths:
        if os.path.isdir(p):
            p = os.path.join(p, "results.json")
        dirs.append(os.path.dirname(p) or ".")
        with open(p) as f:
            results.append(json.load(f))
    merged = dict(results[0])
    merged["commands"] = [c for r in results for c in r["commands"]]
    merged["date"] = max(r["date"] for r in results)
    merged.pop("shard", None)
    merged.pop("records_file", None)
    labels = []
    for r in results:
        for run in r["runs"]:
            if run["label"] not in [x["label"] for x in labels]:
                labels.append(run)
        merged["patch_configs"] = {**merged.get("patch_configs", {}), **r.get("patch_configs", {})}
        for task in ("passkey", "ppl", "ruler"):
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
            if task == "ruler":
                m["tasks"] = list(dict.fromkeys(list(m["tasks"]) + list(r[task]["tasks"])))
                if m["samples"] != r[task]["samples"]:
                    m["samples"] = f"{m['samples']} or {r[task]['samples']}"
            if task == "passkey":
                m["depths"] = sorted(set(m["depths"]) | set(r[task]["depths"]))
                if m["trials"] != r[task]["trials"]:
                    per_len = {}
                    for rec in m["records"]:
                        per_len.setdefault(rec["length"], set()).add(rec["trial"])
                    m["trials"] = ", ".join(f"{len(t)} at {L} tokens" for L, t in sorted(per_len.items()))
    order = [x["label"] for x in labels]
    for task in ("passkey", "ruler"):
        if merged.get(task):
            recs = _dedupe(task, merged[task]["records"])
            merged[task]["records"] = _grid_order(task, recs, order, merged[task].get("tasks", ()))
    merged["runs"] = labels
    merged["merged_from"] = [os.path.abspath(p) for p in paths]
    os.makedirs(out, exist_ok=True)
    merge_record_files([os.path.join(d, "records.jsonl") for d in dirs], os.path.join(out, "records.jsonl"))
    return write_report(merged, out)
