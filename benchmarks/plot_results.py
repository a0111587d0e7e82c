"""A plot beside each results table that compares methods: ``python benchmarks/plot_results.py FILE.md ...``.

Reads the markdown tables of a results file (as the benchmarks write them) and
saves ``FILE.png`` beside it, one panel per table it knows how to draw:

* a ``speedup`` column (kernel and end-to-end tables): one bar per row, the
  row labelled by the columns before the first timing column, against 1x (dense);
* a ``ppl @ L`` column with a ``measured compression`` column (QAQ quality):
  perplexity against compression, dense as a line;
* a table whose header has ``dense`` and method columns of numbers (ablations):
  one group of bars per row.

Tables it cannot draw are left out; a file with none gets no plot.
"""
import os
import re
import sys


def tables(md):
    """[(header, rows)] of the markdown tables in ``md`` (cells as stripped strings)."""
    out, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif cur:
            if len(cur) > 2 and set(cur[1][0]) <= set("-: "):
                out.append((cur[0], cur[2:]))
            cur = []
    return out


def num(s):
    m = re.search(r"-?\d+(\.\d+)?", s.replace("*", ""))
    return float(m.group(0)) if m else None


def draw(ax, header, rows):
    low = [h.lower() for h in header]
    if "speedup" in low or "speed-up" in low:
        i = low.index("speedup") if "speedup" in low else low.index("speed-up")
        first_time = next((j for j, h in enumerate(low) if "dense" in h or "ms" in h), i)
        lab = [" ".join(r[:max(first_time, 1)]) for r in rows]
        val = [num(r[i]) or 0.0 for r in rows]
        ax.barh(range(len(val)), val, color=["tab:green" if v >= 1 else "tab:red" for v in val])
        ax.set_yticks(range(len(val)), [x[:60] for x in lab], fontsize=6)
        ax.axvline(1, color="k", ls="--", lw=1)
        ax.set_xlabel(header[i] + " (dense = 1)")
        ax.invert_yaxis()
        return True
    ppl = next((j for j, h in enumerate(low) if h.startswith("ppl @")), None)
    comp = next((j for j, h in enumerate(low) if "compression" in h), None)
    if ppl is not None and comp is not None:
        for r in rows:
            y, x = num(r[ppl]), num(r[comp])
            if r[0] == "dense":
                ax.axhline(y, color="k", ls="--", lw=1, label="dense")
            elif x is not None and y is not None:
                ax.plot(x, y, "o")
                ax.annotate(r[0][:30], (x, y), fontsize=5)
        ax.set_xlabel("measured compression (x)")
        ax.set_ylabel(header[ppl])
        ax.legend(fontsize=6)
        return True
    if "dense" in low:
        d = low.index("dense")
        cols = list(range(d, len(header)))
        if all(num(r[c]) is not None for r in rows for c in cols if r[c] not in ("-", "")):
            width = 0.8 / len(cols)
            for k, c in enumerate(cols):
                ys = [num(r[c]) or 0.0 for r in rows]
                ax.bar([i + k * width for i in range(len(rows))], ys, width, label=header[c])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r[0][:40] for r in rows], fontsize=6)
            ax.legend(fontsize=6)
            return True
    return False


def plot(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        tabs = tables(f.read())
    drawable = []
    for header, rows in tabs:
        fig, ax = plt.subplots()
        ok = draw(ax, header, rows)
        plt.close(fig)
        if ok:
            drawable.append((header, rows))
    if not drawable:
        return None
    n = len(drawable)
    fig, axes = plt.subplots(n, 1, figsize=(8, max(2.5, min(12, 0.18 * max(len(r) for _, r in drawable) + 1.5)) * n),
                             squeeze=False)
    for ax, (header, rows) in zip(axes[:, 0], drawable):
        draw(ax, header, rows)
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(path), fontsize=8)
    fig.tight_layout()
    out = path[:-3] + ".png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p, "->", plot(p))
