"""Timing helpers shared by the benchmark scripts (CUDA events, CUDA graphs)."""
import json
import os
import platform
import statistics
import time

import torch


def fmt(v, spec):
    """``v`` formatted with ``spec``, or ``-`` for ``None`` (a table cell)."""
    return "-" if v is None else format(v, spec)


def read_jsonl(path):
    """The rows (dicts) of a JSON-lines results file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def hbm_bandwidth(nbytes=2 << 30):
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return nbytes / statistics.median(ts)


def time_graph(fns, reps=30, warmup=3):
    """Capture one CUDA graph calling each fn of `fns` once; median ms per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    del g
    return statistics.median(ts) / len(fns)


def time_eager(fns, reps=30, warmup=5):
    """Median ms per call of calling each fn of `fns` in turn (CPU dispatch included)."""
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for f in fns:
            f()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return statistics.median(ts) / len(fns)


def time_cpu(fn, n=20, warmup=3):
    """Wall-clock median ms of `fn` on the CPU."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def cpu_header():
    return (f"### CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def gpu_header(bw):
    return [f"### GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
            "",
            f"Measured device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s (bytes read + written)."]


def run_benchmark(name, title, gpu_sections, cpu_table):
    """The command line shared by the bench_<name>.py scripts.

    ``gpu_sections(quick)`` returns the markdown parts of the GPU tables;
    ``cpu_table(quick)`` the CPU table. Writes ``<name>_<device>.md`` to
    ``--out`` (default benchmarks/results) and prints it.
    """
    import argparse
    import datetime
    import sys

    import kvsparse

    ap = argparse.ArgumentParser(description=f"{title} benchmark")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true", help="a few points only")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU table")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU tables")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    date = datetime.date.today().isoformat()
    parts = [f"# {title} decode benchmark ({date})", "", f"Command: `python benchmarks/bench_{name}.py`", ""]
    tag = "cpu"
    if torch.cuda.is_available() and not args.no_gpu:
        if not kvsparse.has_cuda():
            sys.exit("kvsparse was built without CUDA kernels")
        parts += gpu_sections(args.quick)
        tag = torch.cuda.get_device_name().replace(" ", "_").lower()
    if not args.no_cpu:
        parts += [cpu_table(args.quick), ""]
    text = "\n".join(parts)
    path = os.path.join(args.out, f"{name}_{tag}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")
