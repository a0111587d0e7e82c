"""Where a patched decode step's time goes, end to end (GPU).

A Llama-shaped random bf16 model with few layers, a static cache of ``--len``
tokens, the decode step compiled as transformers compiles it
(``torch.compile(model.forward, mode="reduce-overhead")``: CUDA graphs);
prints torch's performance hints (e.g. CUDA graphs skipped) and the CUDA
kernels of three profiled steps, by total time.

    python benchmarks/profile_e2e_step.py --method qaq --len 32768 --layers 4
"""
import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="qaq")
    ap.add_argument("--len", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    args = ap.parse_args()
    torch._logging.set_logs(perf_hints=True, graph_breaks=True)
    logging.basicConfig(level=logging.WARNING)
    import kvsparse
    from bench_e2e import METHODS, build_model
    from torch.profiler import ProfilerActivity, profile

    model = build_model(args.shape, layers=args.layers)
    name, kw = METHODS[args.method] or (None, None)
    S = args.len
    if name:
        kvsparse.patch(model, method=name, **kw)
        cache = kvsparse.make_cache(model, 1, S + 64)
    else:
        from transformers import StaticCache
        cache = StaticCache(config=model.config, max_cache_len=S + 64)
    ids = torch.randint(3, 1000, (1, S), device="cuda")
    fwd = model.forward if args.eager else torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    tok = torch.tensor([[5]], device="cuda")
    with torch.no_grad():
        model(ids, **kvsparse.cache_kwargs(model, cache), use_cache=True)

        def step(i):
            pos = torch.tensor([[S + i]], device="cuda")
            return fwd(input_ids=tok, **kvsparse.cache_kwargs(model, cache), position_ids=pos, cache_position=pos[0], use_cache=True)

        for i in range(6):
            step(i)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(6, 26):
            step(i)
        end.record()
        torch.cuda.synchronize()
        print(f"{args.method} S={S} layers={args.layers}: {start.elapsed_time(end) / 20:.3f} ms per step "
              f"({'eager' if args.eager else 'compiled, reduce-overhead'})")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for i in range(26, 29):
                step(i)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
