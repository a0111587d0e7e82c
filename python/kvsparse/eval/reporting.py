"""Reporting: markdown tables, figures and ``results.json`` / ``ruler.json`` of
an evaluation, and the merge of several result folders."""
import json
import os
import platform

import torch

from .runs import MethodRun
from .tasks.ruler import TASKS


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


def ruler_rows(records, model_name):
    """Mean scores in the kvpress leaderboard's RULER layout: one row per
    (dataset, model, method, press parameters, compression_ratio, task,
    context_length, question placement) with ``score`` in percent."""
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
        })
    return rows


def ruler_table(rows, placement):
    """A markdown table (runs x tasks, averaged over lengths; plus one column per
    length averaged over tasks) for one question placement."""
    rows = [r for r in rows if r["question"] == placement]
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
        cells += [f"{mean([r['score'] for r in rr if r['context_length'] == L]):.0f}" for L in lengths]
        cells.append(f"{mean([r['score'] for r in rr]):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ruler_plot(path, rows, title):
    """Mean score against context length, one line per run, a panel per question placement."""
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
        for run in dict.fromkeys(r["press"] for r in rr):
            lengths = sorted({r["context_length"] for r in rr if r["press"] == run})
            ys = []
            for L in lengths:
                xs = [r["score"] for r in rr if r["press"] == run and r["context_length"] == L]
                ys.append(sum(xs) / len(xs))
            ax.plot(lengths, ys, marker="o", label=run)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("RULER score (%)")
        ax.set_ylim(-5, 105)
        ax.set_title(f"question {'in the prompt' if place == 'prompt' else 'decoded under the method'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title, fontsize=9, dpi=110)


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
