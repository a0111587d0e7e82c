"""Selection recall: how much of the dense attention mass the pages a Quest
rule selects hold, against the best pages at the same budget (the oracle).

The model decodes passkey prompts densely (the context prefilled, the question
and the answer decoded token by token, every token dense). At each decode
step, in each full-attention layer, the query (post-RoPE) and the cached keys
(post-RoPE, as the model's own attention receives them) give:

* the dense attention weights of every query head, summed per page of
  ``page_size`` tokens (the *page mass*; a head's masses sum to 1);
* for each rule (a Quest run: budget, GQA mode, sink / recent pages, top-p),
  the pages :func:`kvsparse.methods.quest.select` takes from the page bounds
  (the same function a patched model's decode step calls);
* **recall**: the page mass a query head gets from the pages its row
  selected; **oracle**: the same with the pages that hold the most mass of
  the row (the row's query heads summed; one row per KV head, or per query
  head for ``mode="head"``), as many as the rule selected.

Recall / oracle near 1 means the bounds find the pages attention needs;
well below 1 in a layer means selection fails there. For passkey prompts the
needle's pages are tracked too: the share of steps at which every needle page
was selected, in the layers where dense attention gives the needle a
noticeable mass.

Sliding-window layers (Gemma 3's local layers) are left out: kvsparse does
not select in them.
"""
import math
import random

import torch

from ..decoding import _tqdm
from ..runs import method_applied
from .passkey import make_passkey_prompt

__all__ = ["run_recall", "recall_tables", "recall_plot", "RULE_FIELDS"]

#: the config fields that define a selection rule (reported per run)
RULE_FIELDS = ("token_budget", "page_size", "mode", "sink_pages", "recent_pages", "top_p")

#: a layer counts as "needle-attending" at a step when dense attention gives the
#: needle's pages at least this mass (mean over the query heads)
NEEDLE_MASS = 0.05


def _windowed_layers(config):
    from ...geometry import WINDOWED_LAYER_TYPES

    types = getattr(config, "layer_types", None) or []
    return {i for i, t in enumerate(types) if t in WINDOWED_LAYER_TYPES}


def _rule_configs(model, runs):
    cfgs = []
    for run in runs:
        if run.method != "quest":
            raise ValueError(f"kvsparse: --task recall measures Quest selection rules; run {run.label!r} "
                             f"is {run.method!r} (pass --method quest)")
        with method_applied(model, run):
            cfgs.append((run, model.kvsparse_config))
    return cfgs


class _Recorder:
    """Accumulates recall / oracle / needle statistics per (rule, layer)."""

    def __init__(self, rules, windowed):
        self.rules = rules
        self.windowed = windowed
        self.needle = None  # (start, end) token range of the current prompt's needle
        self.stats = {}

    def observe(self, layer_idx, query, key, scaling):
        from ...methods import quest as qm
        from ... import quest as qops

        if layer_idx in self.windowed:
            return
        B, H, _, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        G = H // Hkv
        q = query[:, :, 0].contiguous()
        k = key.contiguous()
        logits = torch.einsum("bkgd,bksd->bkgs", q.float().view(B, Hkv, G, D), k.float()) * scaling
        w = torch.softmax(logits, -1).view(B, H, S)
        seq = torch.full((B,), S, dtype=torch.int32, device=k.device)
        for run, cfg in self.rules:
            P = cfg.page_size
            n_pages = -(-S // P)
            mass = torch.nn.functional.pad(w, (0, n_pages * P - S)).view(B, H, n_pages, P).sum(-1)
            kmin, kmax = qops.page_metadata(k, seq, P)
            idx = qm.select(q, kmin, kmax, seq, P, cfg.token_budget, cfg, Hkv, scaling)
            rows = idx.shape[1]
            sel = torch.zeros(B, rows, n_pages + 1, dtype=torch.bool, device=k.device)
            sel.scatter_(-1, torch.where(idx >= 0, idx.long(), torch.full_like(idx.long(), n_pages)), True)
            sel = sel[..., :n_pages]
            per_row = H // rows
            sel_h = sel.repeat_interleave(per_row, dim=1)  # row r serves query heads r*per_row ..
            recall = (mass * sel_h).sum(-1)  # [B, H]
            # oracle: the row's most massive pages (the row's heads summed), as many as selected
            row_mass = mass.view(B, rows, per_row, n_pages).sum(2)
            count = sel.sum(-1)  # [B, rows]
            order = row_mass.argsort(-1, descending=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_pages, device=k.device)
                                                     .expand_as(order))
            best = (rank < count.unsqueeze(-1)).repeat_interleave(per_row, dim=1)
            oracle = (mass * best).sum(-1)
            st = self.stats.setdefault((run.label, layer_idx), dict(
                steps=0, recall=0.0, oracle=0.0, needle_steps=0, needle_hit=0, needle_mass=0.0,
                needle_kept=0.0, needle_oracle=0.0, pages=0.0))
            st["steps"] += B * H
            st["recall"] += float(recall.sum())
            st["oracle"] += float(oracle.sum())
            st["pages"] += float(count.float().mean()) * B * H
            if self.needle is not None:
                a, b = self.needle
                pa, pb = a // P, (b - 1) // P
                nm = mass[..., pa:pb + 1].sum(-1)  # [B, H]
                if float(nm.mean()) >= NEEDLE_MASS:
                    st["needle_steps"] += 1
                    st["needle_mass"] += float(nm.mean())
                    st["needle_hit"] += int(bool(sel_h[..., pa:pb + 1].all()))
                    # the share of the needle's mass on kept pages (rule, oracle)
                    kept = (mass[..., pa:pb + 1] * sel_h[..., pa:pb + 1]).sum(-1)
                    okept = (mass[..., pa:pb + 1] * best[..., pa:pb + 1]).sum(-1)
                    st["needle_kept"] += float(kept.sum() / nm.sum())
                    st["needle_oracle"] += float(okept.sum() / nm.sum())


def run_recall(model, tok, runs, lengths, depths, trials, seed=0, fmt="plain", max_new_tokens=4,
               progress=True):
    """Selection recall of every Quest run, over passkey prompts decoded densely.

    Args:
        runs: Quest runs (:class:`~kvsparse.eval.runs.MethodRun`); a dense
            run is skipped (it is the trajectory).
        lengths, depths, trials: the passkey prompts (as :func:`run_passkey`).
        max_new_tokens: answer tokens decoded after the question.

    Returns:
        a list of records, one per (run, layer): ``recall`` and ``oracle``
        (mean page mass over query heads and decode steps), their ratio,
        ``pages`` (mean pages selected per row), and the needle columns
        (``needle_steps``: steps at which the layer gave the needle at least
        :data:`NEEDLE_MASS`; ``needle_hit``: the share of those at which
        every needle page was selected).
    """
    from transformers import AttentionInterface, DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ... import hf

    runs = [r for r in runs if r.method != "dense"]
    rules = _rule_configs(model, runs)
    rec = _Recorder(rules, _windowed_layers(model.config))
    impl = model.config._attn_implementation
    base = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None
    if base is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as base

    def observed(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        if query.shape[2] == 1 and rec.active:
            s = scaling if scaling is not None else module.head_dim ** -0.5
            rec.observe(module.layer_idx, query, key, s)
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)

    name = "kvsparse_recall_" + impl
    AttentionInterface.register(name, observed)
    rec.active = False
    n = len(lengths) * len(depths) * trials
    bar = _tqdm(total=n, desc="recall", disable=not progress)
    device = next(model.parameters()).device
    hf._set_attn_implementation(model, name)
    try:
        with torch.no_grad():
            for L in lengths:
                for depth in depths:
                    for t in range(trials):
                        rng = random.Random(f"passkey-{seed}-{L}-{depth}-{t}")
                        p = make_passkey_prompt(tok, L, depth, rng, fmt=fmt)
                        rec.needle = (p.needle_start, p.needle_end)
                        cache = DynamicCache(config=model.config)
                        ctx = torch.tensor([p.context_ids], device=device)
                        out = model(ctx, use_cache=True, **hf.cache_kwargs(model, cache))
                        rec.active = True
                        pos = len(p.context_ids)
                        nxt = None
                        feed = list(p.question_ids)
                        for i in range(len(feed) + max_new_tokens):
                            tok_id = feed[i] if i < len(feed) else nxt
                            ids = torch.tensor([[tok_id]], device=device)
                            out = model(ids, use_cache=True, position_ids=torch.tensor([[pos]], device=device),
                                        **hf.cache_kwargs(model, cache))
                            pos += 1
                            nxt = int(out.logits[0, -1].argmax())
                        rec.active = False
                        del cache
                        bar.update(1)
    finally:
        rec.active = False
        hf._set_attn_implementation(model, impl)
        bar.close()
    records = []
    for (label, layer), st in sorted(rec.stats.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        run, cfg = next((r, c) for r, c in rules if r.label == label)
        n = max(st["steps"], 1)
        records.append({
            "run": label, "layer": layer, **{f: getattr(cfg, f) for f in RULE_FIELDS},
            "dense_layer": layer < cfg.dense_layers,
            "recall": st["recall"] / n, "oracle": st["oracle"] / n,
            "ratio": st["recall"] / st["oracle"] if st["oracle"] > 0 else float("nan"),
            "pages": st["pages"] / n, "needle_steps": st["needle_steps"],
            "needle_hit": st["needle_hit"] / st["needle_steps"] if st["needle_steps"] else float("nan"),
            "needle_mass": st["needle_mass"] / st["needle_steps"] if st["needle_steps"] else float("nan"),
            "needle_kept": st["needle_kept"] / st["needle_steps"] if st["needle_steps"] else float("nan"),
            "needle_oracle": st["needle_oracle"] / st["needle_steps"] if st["needle_steps"] else float("nan"),
        })
    return records


def _fmt(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def recall_tables(records):
    """Markdown: per run, recall / oracle over the sparse layers (layers past
    ``dense_layers``) and the needle hit rate; then recall per layer."""
    runs = list(dict.fromkeys(r["run"] for r in records))
    lines = ["| rule | pages | recall | oracle | recall / oracle | worst layer (ratio) | needle steps | "
             "needle pages all kept | needle mass kept | oracle's |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for lab in runs:
        rs = [r for r in records if r["run"] == lab and not r["dense_layer"]]
        if not rs:
            continue
        rec = sum(r["recall"] for r in rs) / len(rs)
        ora = sum(r["oracle"] for r in rs) / len(rs)
        worst = min(rs, key=lambda r: r["ratio"])
        ns = sum(r["needle_steps"] for r in rs)
        def needle(col):
            return sum(r[col] * r["needle_steps"] for r in rs if r["needle_steps"]) / ns if ns else float("nan")
        hit, kept, okept = needle("needle_hit"), needle("needle_kept"), needle("needle_oracle")
        pages = sum(r["pages"] for r in rs) / len(rs)
        lines.append(f"| {lab} | {pages:.1f} | {rec:.3f} | {ora:.3f} | {rec / ora:.3f} | "
                     f"{worst['layer']} ({worst['ratio']:.2f}) | {ns} | {_fmt(hit, '.2f')} | {_fmt(kept, '.2f')} | "
                     f"{_fmt(okept, '.2f')} |")
    summary = "\n".join(lines)
    layers = sorted({r["layer"] for r in records})
    head = "| rule | " + " | ".join(str(i) for i in layers) + " |"
    lines = [head, "|---|" + "---:|" * len(layers)]
    for lab in runs:
        by = {r["layer"]: r for r in records if r["run"] == lab}
        lines.append(f"| {lab} | " + " | ".join(_fmt(by[i]["ratio"], ".2f") if i in by else "-"
                                                 for i in layers) + " |")
    return summary, "\n".join(lines)


def recall_plot(path, records, title):
    """Recall and oracle per layer, one line per rule; returns the path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for lab in dict.fromkeys(r["run"] for r in records):
        rs = sorted((r for r in records if r["run"] == lab), key=lambda r: r["layer"])
        line, = ax.plot([r["layer"] for r in rs], [r["recall"] for r in rs], marker="o", ms=3, label=lab)
        ax.plot([r["layer"] for r in rs], [r["oracle"] for r in rs], ls="--", lw=0.8, color=line.get_color())
    ax.set_xlabel("layer")
    ax.set_ylabel("dense attention mass on selected pages")
    ax.set_ylim(0, 1.02)
    ax.set_title(title + " (dashed: oracle at the same page count)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
