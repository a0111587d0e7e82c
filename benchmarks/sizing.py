"""Sizing: the bytes each method's cache holds per token and layer, and what fits on one GPU.

Measured, not estimated: for each method a real kvsparse cache of one decoder layer of the chosen
shape (its KV heads, head dim and dtype; the MLP and vocabulary shrunk, which the cache does not
see) is filled with a prefill of ``--tokens`` random tokens on the CPU, then

* ``in use``: the cache's ``memory_report()["total"]`` where the method has one (the bytes its
  tokens occupy, metadata included), else every tensor it holds;
* ``allocated``: every tensor the layer holds (``state_tensors()``), which for a static cache is
  what ``make_cache(..., max_cache_len=N)`` takes up front; QAQ's static stores are sized for the
  largest width, so they hold more than their tokens use.

Both are divided by the token count. The table then scales them to the shape's full layer count
at 128k, 512k and 1M tokens (B = 1), adds the bf16 weights, and says whether that fits on one
80 GiB and one 141 GiB GPU: weights + allocated cache + ``--headroom`` (default 2 GiB, a decode
step's transients) within what torch can allocate on the card. A prefill adds its activations
(chunked prefill: bounded by the chunk; see ``bench_capacity.py``'s ``prefill_peak_gib``).

Random weights give QAQ's adaptive widths no meaning, so its rows use fixed widths
(``uniform_bits``); QAQ's default widths on real models sit between the 4- and 8-bit rows (the
measured compression is in ``results/qaq_pages_smollm2_2k_cpu.md``).

Usage (CPU, about a minute)::

    python benchmarks/sizing.py --shape llama3-8b --out benchmarks/results
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402
from bench_capacity import held_bytes  # noqa: E402

GiB = 2 ** 30
LENGTHS = (131072, 524288, 1048576)
#: what torch can allocate on each card (``torch.cuda.mem_get_info`` total): H100 80GB, H200 141 GB
GPUS = (("H100 79.2", 79.2), ("H200 139.8", 139.8))

#: (label, method, kwargs): every registered method at its defaults, QAQ at fixed widths.
ROWS = (
    ("dense (bf16)", None, {}),
    ("Quest (page 16)", "quest", {}),
    ("SparQ", "sparq", {}),
    ("QAQ 8-bit (offsets)", "qaq", {"uniform_bits": 8}),
    ("QAQ 4-bit (offsets)", "qaq", {"uniform_bits": 4}),
    ("QAQ 4-bit (pages)", "qaq", {"uniform_bits": 4, "layout": "pages"}),
    ("QAQ 8-bit (pages)", "qaq", {"uniform_bits": 8, "layout": "pages"}),
    ("Quest over QAQ 4-bit", "quest_qaq", {"uniform_bits": 4, "dense_layers": 0}),
)


def weight_bytes(shape):
    """bf16 bytes of the full shape's parameters, counted from a meta-device model."""
    import transformers

    cfg = bench_e2e.model_config(shape)
    with torch.device("meta"):
        model = getattr(transformers, bench_e2e.SHAPES[shape][1])._from_config(cfg, dtype=torch.bfloat16)
    return sum(p.numel() * 2 for p in model.parameters())


def one_layer_model(shape):
    cfg = bench_e2e.model_config(shape)
    full_layers = cfg.num_hidden_layers
    cfg.num_hidden_layers = 1
    cfg.intermediate_size = 64
    cfg.vocab_size = 256
    if hasattr(cfg, "layer_types"):
        cfg.layer_types = ["full_attention"]
    return bench_e2e.build_model(shape, config=cfg, device="cpu", dtype=torch.bfloat16), full_layers


def measure(model, method, kwargs, tokens):
    """``(in use, {L: allocated})``: bytes per token of the one layer, in use after a prefill of
    ``tokens - 1`` tokens, and allocated by a fresh static cache of capacity ``L`` (each of
    :data:`LENGTHS`; ``torch.empty``-style buffers, so nothing is touched)."""
    import kvsparse

    Hkv = model.config.num_key_value_heads
    D = model.config.head_dim
    if method is None:
        b = 2 * Hkv * D * 2
        return b, {L: b for L in LENGTHS}
    if getattr(model, "kvsparse_config", None):
        kvsparse.unpatch(model)
    kvsparse.patch(model, method=method, **kwargs)
    cache = kvsparse.make_cache(model, batch_size=1, max_cache_len=tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens - 1))
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1, use_cache=True, **kvsparse.cache_kwargs(model, cache))
    use = None
    if hasattr(cache, "memory_report"):
        rep = cache.memory_report()
        use = rep.get("total") if isinstance(rep, dict) else None
    use = (use if use is not None else held_bytes(cache)) / (tokens - 1)
    held = {}
    for L in LENGTHS:
        del cache
        cache = kvsparse.make_cache(model, batch_size=1, max_cache_len=L)
        held[L] = held_bytes(cache) / L
    return use, held


def table(shape, rows, weights, layers, headroom):
    out = [f"| method | B/token/layer in use | allocated (at 1M) | "
           + " | ".join(f"{L // 1024}k: GiB ({' / '.join(n for n, _ in GPUS)})" for L in LENGTHS) + " |",
           "|---|---:|---:|" + "---:|" * len(LENGTHS)]
    for label, use, held in rows:
        cells = []
        for L in LENGTHS:
            need = weights + held[L] * layers * L
            fits = " / ".join("yes" if need + headroom * GiB <= cap * GiB else "no" for _, cap in GPUS)
            cells.append(f"{need / GiB:.1f} ({fits})")
        out.append(f"| {label} | {use:,.0f} | {held[LENGTHS[-1]]:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(bench_e2e.SHAPES))
    ap.add_argument("--tokens", type=int, default=2048, help="tokens prefilled into each measured cache")
    ap.add_argument("--headroom", type=float, default=2.0,
                    help="GiB left for a decode step's activations and workspaces in the fits column (default 2)")
    ap.add_argument("--out", default=None, help="write sizing_<shape>.md and .json there")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, layers = one_layer_model(args.shape)
    weights = weight_bytes(args.shape)
    rows = []
    for label, method, kwargs in ROWS:
        use, held = measure(model, method, kwargs, args.tokens)
        rows.append((label, use, held))
        print(f"{label}: {use:,.0f} B in use, {held[LENGTHS[-1]]:,.0f} B allocated per token and layer at 1M",
              flush=True)
    cfg = model.config
    head = (f"# Sizing: cache bytes per token and layer, and what fits on one GPU ({args.shape})\n\n"
            f"`python benchmarks/sizing.py --shape {args.shape}`: one layer of the shape ({cfg.num_key_value_heads} KV "
            f"heads, head dim {cfg.head_dim}, bf16) filled with {args.tokens} tokens on the CPU, each method's "
            f"cache measured (see the script's docstring); totals for {layers} layers, B = 1, plus "
            f"{weights / GiB:.1f} GiB of bf16 weights; yes / no: weights + allocated cache + {args.headroom:g} GiB of headroom for a decode step's "
            f"activations within what torch can allocate on an H100 80GB (79.2 GiB) / an H200 (139.8 GiB). A prefill "
            f"needs more: chunked, its activations are bounded by the chunk (`bench_capacity.py` reports "
            f"`prefill_peak_gib`).\n\n")
    text = head + table(args.shape, rows, weights, layers, args.headroom) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"sizing_{args.shape}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, f"sizing_{args.shape}.json"), "w") as f:
            json.dump(dict(shape=args.shape, layers=layers, weights=weights, tokens=args.tokens,
                           rows=[dict(label=l, in_use=u, allocated={str(k): v for k, v in h.items()}) for l, u, h in rows]), f, indent=1)


if __name__ == "__main__":
    main()
