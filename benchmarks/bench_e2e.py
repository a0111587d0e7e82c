"""End-to-end ``model.generate()`` decode: patched against unpatched, as a user runs it.

Random-weight bf16 models (nothing is downloaded) of the shapes in
``SHAPES``: Llama 2 7B, Llama 3 8B, Qwen3 8B (q/k norms) and Gemma 3 12B (text:
five sliding-window layers of 1024 tokens per full-attention layer, head_dim
256; kvsparse runs the full layers, transformers the sliding ones). B
sequences of S random prompt tokens, greedy decoding of ``--new`` tokens:

* ``static``: a static cache passed to ``generate()`` (dense: transformers'
  ``StaticCache``; patched: ``kvsparse.make_cache(model, B, S + new)``) and
  transformers' own compile of the decode step (a short warm-up ``generate()``
  into the same cache compiles it first, so no compile time is timed);
* ``eager``: ``generate()`` with its default dynamic cache (patched: the
  method's dynamic cache, made by ``generate()``).

Per row: decode ms per token (median of the per-step times inside one
``generate()``, read by a logits processor after a device sync, first two
steps left out), the speed-up against dense in the same mode and run, the
prefill time, peak GPU memory (``max_memory_allocated`` over the timed
``generate()``), the KV bytes the cache holds, and the byte floor: (weights +
the KV bytes one decode step must read, :func:`step_read_bytes`) / measured
copy bandwidth, with the row's share of it (floor / measured).

Usage (GPU)::

    python benchmarks/bench_e2e.py --shape llama3-8b --mode static --lens 32768 \\
        --methods dense,quest,sparq --out benchmarks/results

Each call appends its rows to ``<out>/e2e_<device>.jsonl`` and rewrites
``<out>/e2e_<device>.md`` (and a plot, when matplotlib is there) from every
row of that file, so that several calls (one per shape and mode) make one
table.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, read_jsonl  # noqa: E402

#: per shape: the transformers config class, the causal LM class and the config's
#: fields (every shape: hidden, intermediate, layers, heads, KV heads, head_dim, vocab)
SHAPES = {
    "llama2-7b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, vocab_size=32000)),
    "llama3-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0)),
    # Qwen3's own q/k norms (Qwen3Attention); no sliding window
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, use_sliding_window=False,
        tie_word_embeddings=False)),
    # text only; five sliding-window layers then one full (layer_types, made by model_config)
    "gemma3-12b": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256,
        rope_theta=1e6, rope_local_base_freq=1e4)),
}
#: Gemma 3's layer pattern: this many sliding-window layers, then one full-attention layer
GEMMA3_SLIDING_PER_FULL = 5

METHODS = {
    "dense": None,
    "quest": ("quest", dict(token_budget=2048, page_size=16)),  # the default rule ("softmax", a sink page)
    # the GQA selection modes (quest.combine_scores); "quest-group": the fused kernel
    # (no sink page), the baseline of the default rule's cost
    "quest-group": ("quest", dict(token_budget=2048, page_size=16, mode="group", sink_pages=0)),
    "quest-nosink": ("quest", dict(token_budget=2048, page_size=16, sink_pages=0)),
    "quest-head-sink": ("quest", dict(token_budget=2048, page_size=16, mode="head", recent_pages=4)),
    "quest-max": ("quest", dict(token_budget=2048, page_size=16, mode="max")),
    "quest-softmax": ("quest", dict(token_budget=2048, page_size=16, mode="softmax")),
    "quest-union": ("quest", dict(token_budget=2048, page_size=16, mode="union")),
    "sparq": ("sparq", dict(compression=1 / 8)),
    "qaq": ("qaq", dict()),
    # per-KV-head groups: 2 outlier slots per head instead of 22 shared ones at Llama-3-8B (E = 1024)
    "qaq-head": ("qaq", dict(shared=False)),
    # QAQ on width-binned pages (kvsparse.qaqp): the default widths, and uniform 4 bits
    "qaq-pages": ("qaq", dict(layout="pages")),
    "qaq-pages-4bit": ("qaq", dict(layout="pages", uniform_bits=4)),
    # Quest over QAQ: QAQ's default widths, uniform 4 bits (shared groups), uniform 4 bits per-head groups
    "quest_qaq": ("quest_qaq", dict(token_budget=2048, page_size=16)),
    "quest_qaq-4bit": ("quest_qaq", dict(token_budget=2048, page_size=16, uniform_bits=4)),
    "quest_qaq-4bit-head": ("quest_qaq", dict(token_budget=2048, page_size=16, uniform_bits=4, shared=False)),
}


def model_config(shape, layers=None):
    """The transformers config of ``shape`` (``layers``: fewer decoder
    layers, a quick look; for Gemma 3 a multiple of 6, so that the 5:1
    pattern of sliding-window and full layers stays). No CUDA needed.

    The rope fields go by their 4.57 names (``rope_theta``,
    ``rope_local_base_freq``): transformers 4.57 takes them as they are, 5.x
    reads them into ``rope_parameters`` (per layer type for Gemma 3).
    Gemma 3's pattern is an explicit ``layer_types`` (both take it); the
    context length allowed is ``1 << 18`` tokens."""
    import transformers

    cfg_name, _, fields = SHAPES[shape]
    kw = dict(fields)
    if layers:
        kw["num_hidden_layers"] = int(layers)
    L = kw["num_hidden_layers"]
    if cfg_name == "Gemma3TextConfig":
        period = GEMMA3_SLIDING_PER_FULL + 1
        if L % period:
            raise ValueError(f"{shape}: --layers must be a multiple of {period} (the 5:1 pattern of "
                             f"sliding-window and full layers), got {L}")
        kw["layer_types"] = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(L)]
    return getattr(transformers, cfg_name)(max_position_embeddings=1 << 18, **kw)


def build_model(shape, layers=None, config=None, device="cuda", dtype=torch.bfloat16):
    """A random-weight model of ``shape`` (``config``: instead of
    :func:`model_config`'s, e.g. smaller dims for a CPU check)."""
    import transformers

    cfg = config if config is not None else model_config(shape, layers)
    model_cls = getattr(transformers, SHAPES[shape][1])
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls._from_config(cfg, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class StepClock:
    """A logits processor that records the time of every decode step."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.t.append(time.perf_counter())
        return scores


def run_generate(model, ids, new, cache=None, prefill_chunk=None):
    from transformers import LogitsProcessorList

    clock = StepClock()
    kw = {} if cache is None else {"past_key_values": cache}
    if prefill_chunk and ids.shape[1] > prefill_chunk:
        # transformers' chunked prefill: no [S, S] mask or attention transient
        kw["prefill_chunk_size"] = prefill_chunk
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, logits_processor=LogitsProcessorList([clock]), **kw)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    steps = [b - a for a, b in zip(clock.t, clock.t[1:])][2:]
    return (clock.t[0] - t0), statistics.median(steps) * 1e3, t1 - t0


def kv_bytes(cache):
    """Bytes the cache's tensors hold (every layer), from the tensors themselves."""
    if cache is None:
        return 0
    total = 0
    seen = set()
    for layer in cache.layers:
        for name, t in vars(layer).items():
            if torch.is_tensor(t) and t.is_cuda and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
            elif hasattr(t, "tensors") and callable(t.tensors):  # a QAQ QuantStore
                for u in t.tensors():
                    if u.data_ptr() not in seen:
                        seen.add(u.data_ptr())
                        total += u.numel() * u.element_size()
    return total


def layer_split(method, cfg):
    """``(sliding, dense, sparse)``: the decoder layers of ``cfg`` by what a
    decode step of ``method`` (a ``METHODS`` value) reads in them.

    * sliding: the sliding-window layers of a hybrid model (Gemma 3,
      :func:`kvsparse.geometry.sliding_layers`): kvsparse leaves them to
      transformers' own cache layer and windowed attention, for every method
      (and dense);
    * dense: the full layers that the method runs densely: kvsparse's rule
      (``kvsparse.hf``'s attention and ``report()``) is ``layer_idx <
      dense_layers``, the layer index in the whole model, not the rank among
      the full layers. At Gemma 3's 5:1 pattern with Quest's default
      ``dense_layers=2`` no full layer is dense (layers 0 and 1 are sliding,
      the first full one is 5);
    * sparse: the other full layers (the method's bytes).

    ``dense_layers`` is the method config's (its default when not given:
    Quest and Quest over QAQ 2, SparQ and QAQ 0). Dense (``method`` None):
    every full layer is dense."""
    from kvsparse.geometry import sliding_layers

    sliding = set(sliding_layers(cfg))
    full = [i for i in range(cfg.num_hidden_layers) if i not in sliding]
    if method is None:
        return sorted(sliding), full, []
    from kvsparse import make_config

    dense_layers = make_config(method[0], **method[1]).dense_layers
    dense = [i for i in full if i < dense_layers]
    return sorted(sliding), dense, [i for i in full if i >= dense_layers]


def step_read_bytes(method, kw, cfg, B, S):
    """KV bytes one decode step must read (all layers), by the method's definition.

    Sliding-window layers (Gemma 3) read ``min(S, sliding_window)`` tokens
    dense (bf16), whatever the method; the method's dense layers
    (:func:`layer_split`) read ``S`` tokens dense; its other layers the
    method's bytes. Dense: every full layer reads ``S`` tokens."""
    Hkv = cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    row = 2 * Hkv * D * 2  # K + V of one token, bf16
    sliding, dense, sparse = layer_split(method, cfg)
    local = len(sliding) * B * min(S, cfg.sliding_window or S) * row if sliding else 0
    if method is None:
        return local + len(dense) * B * S * row
    n_dense, n_sparse = len(dense), len(sparse)
    name, args = method
    if name == "quest":
        P = args.get("page_size", 16)
        budget = min(args.get("token_budget", 1024), S)
        meta = 2 * Hkv * D * 2 * (S // P)  # kmin + kmax
        per_sparse = meta + budget * row
        return local + B * (n_dense * S * row + n_sparse * per_sparse)
    if name == "quest_qaq":  # the selected tokens' codes at the uniform width (8: an upper bound) + metadata
        P = args.get("page_size", 16)
        budget = min(args.get("token_budget", 1024), S)
        bits = args.get("uniform_bits") or 8
        n_out = 4 if args.get("shared", True) is False else 22  # alpha 0.02: E = 128 / 1024
        tok = 2 * Hkv * (D * bits // 8 + 9 + n_out * 4)  # K + V codes and metadata, every KV head's read
        meta = 2 * Hkv * D * 2 * (S // P)
        return local + B * (n_dense * S * tok + n_sparse * (meta + budget * tok))
    if name == "sparq":
        c = args.get("compression", 1 / 8)
        return local + B * n_dense * S * row + int(n_sparse * B * S * row * c)
    return local + (n_dense + n_sparse) * B * S * row  # qaq: main() uses the bytes its cache holds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--mode", choices=("static", "eager"), default="static")
    ap.add_argument("--lens", default="32768")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--methods", default="dense,quest,sparq")
    ap.add_argument("--new", type=int, default=24, help="decoded tokens per generate()")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a quick look; not for the table)")
    ap.add_argument("--dense-below", type=int, default=None, help="config dense_below for every method")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="prefill in chunks of this many tokens (generate(prefill_chunk_size=...)); a 128k "
                         "prefill of Gemma 3 12B otherwise builds a 16 GiB [S, S] mask and runs out of memory "
                         "on an 80 GiB card")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    import kvsparse
    import transformers
    from _common import hbm_bandwidth

    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "_").lower()
    bw = hbm_bandwidth()
    model = build_model(args.shape, args.layers)
    cfg = model.config
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    path = os.path.join(args.out, f"e2e_{dev}.jsonl")
    for S in [int(x) for x in args.lens.split(",")]:
        B, new = args.batch, args.new
        g = torch.Generator(device="cuda").manual_seed(S)
        ids = torch.randint(3, cfg.vocab_size, (B, S), device="cuda", generator=g)
        dense_ms = None
        for mname in args.methods.split(","):
            method = METHODS[mname]
            kvsparse.unpatch(model)
            extra = {} if args.dense_below is None else {"dense_below": args.dense_below}
            if method is not None:
                kvsparse.patch(model, method=method[0], **method[1], **extra)
            cache = None
            err = None
            t_row = time.perf_counter()
            warm_s = None
            try:
                if args.mode == "static":
                    if method is None:
                        from transformers import StaticCache

                        cache = StaticCache(config=cfg, max_cache_len=S + new)
                    else:
                        cache = kvsparse.make_cache(model, B, S + new)
                    # compile the decode step on a short prompt into the same cache
                    run_generate(model, ids[:, :16], 4, cache)
                    cache.reset()
                else:
                    run_generate(model, ids[:, :16], 4)
                warm_s = time.perf_counter() - t_row  # the warm-up (compile) generate()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                prefill_s, ms, _ = run_generate(model, ids, new, cache, args.prefill_chunk)
                peak = torch.cuda.max_memory_allocated()
                held = kv_bytes(cache) if cache is not None else None
                used = None
                if method is not None and method[1].get("layout") == "pages":
                    used = cache.memory_report()["total"]  # the pages in use (a static arena is sized for 8 bits)
            except torch.OutOfMemoryError as e:  # report, go on with the next row
                err, ms, prefill_s, peak, held, used = "OOM", None, None, None, None, None
                print(f"{mname} S={S}: {str(e).splitlines()[0]}", flush=True)
            del cache
            torch.cuda.empty_cache()
            if mname == "dense":
                dense_ms = ms
            read = step_read_bytes(method, {}, cfg, B, S)
            if method is not None and method[0] == "qaq" and held:
                read = used or held  # QAQ attends every token: a step reads what the cache holds (in use)
            floor_ms = (wbytes + read) / bw * 1e3
            row = dict(
                date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                torch=torch.__version__, transformers=transformers.__version__,
                shape=args.shape + (f"-{args.layers}L" if args.layers else ""), mode=args.mode, S=S, B=B,
                method=mname if method is None else f"{mname} {json.dumps(method[1], sort_keys=True)}",
                decode_ms=ms, speedup=(dense_ms / ms) if (ms and dense_ms) else None,
                prefill_s=prefill_s, peak_gib=peak / 2**30 if peak else None,
                kv_gib=held / 2**30 if held else None, floor_ms=floor_ms,
                floor_share=(floor_ms / ms) if ms else None, bw_tbs=bw / 1e12, error=err,
                prefill_chunk=args.prefill_chunk,
                warmup_s=warm_s, row_s=time.perf_counter() - t_row,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(path, "a") as f:  # each row as it comes (a call cut short keeps its rows)
                f.write(json.dumps(row) + "\n")
    write_table(path)


def write_table(jsonl):
    rows = read_jsonl(jsonl)
    if not rows:
        return
    out = jsonl[: -len(".jsonl")]
    r0 = rows[-1]
    lines = [
        f"# End-to-end `generate()` decode ({r0['date']})", "",
        f"Device: {r0['device']}, torch {r0['torch']}, transformers {r0['transformers']}; "
        f"copy bandwidth {r0['bw_tbs']:.2f} TB/s. Random-weight bf16 models (Llama, Qwen3, Gemma 3 shapes), "
        "greedy decoding; `python benchmarks/bench_e2e.py` (see its docstring).", "",
        "decode = median ms per generated token inside one `generate()`; speed-up = dense / method, same "
        "mode, same run; floor = (weights + KV bytes the step must read) / bandwidth; share = floor / decode.",
        "",
        "| shape | mode | S | B | method | decode ms | speed-up | prefill s | peak GiB | KV GiB | floor ms | share |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['S']} | {r['B']} | {r['method']} | "
            f"{fmt(r['decode_ms'], '.2f') if not r.get('error') else r['error']} | "
            f"{fmt(r['speedup'], '.2f')} | {fmt(r['prefill_s'], '.2f')} | {fmt(r['peak_gib'], '.1f')} | "
            f"{fmt(r['kv_gib'], '.2f')} | {fmt(r['floor_ms'], '.2f')} | {fmt(r['floor_share'], '.2f')} |")
    text = "\n".join(lines) + "\n"
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = {}
    for r in rows:
        if r["speedup"] is not None and not r["method"].startswith("dense"):
            key = f"{r['shape']} {r['mode']} B={r['B']} {r['method'].split()[0]}"
            groups.setdefault(key, []).append((r["S"], r["speedup"]))
    for key, pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens S")
    ax.set_ylabel("decode speed-up vs dense")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)


if __name__ == "__main__":
    main()
