"""Benchmark of the decode attention over QAQ's width-binned pages (kvsparse.qaqp)
against dense SDPA, and of the decode-step append.

GPU table (issue 22's points): B in {1, 8}, H=32, H_kv=8, D=128, bf16, S in
{32k, 128k}; widths uniform 4 bits, uniform 8 bits, and the default config's
shares on SmolLM2 (keys 4 / 8 bits at 0.529 / 0.471, values 2 / 4 / 8 at
0.866 / 0.090 / 0.044; benchmarks/results/qaq_widths_smollm2_cpu.md), drawn per
token; 2 outliers per token for K and for V. For each point, in the same run:
  * dense  torch SDPA over bf16 K, V (one decode query, enable_gqa),
  * qaqp   kvsparse.qaqp.attention over every page of the store,
  * old    (B=1, 32k, 4 bits only) kvsparse.qaq.attention on the per-token
           offset format, for comparison.
Times are CUDA-event medians of CUDA-graph replays rotating over copies of
the caches (at least 512 MiB in all, so that they never sit in L2), per call.
Bytes (the roofline): what the attention must read, per live token its class's
code bytes + 8 (scales, zeros) + outliers, plus each page's 16-byte header;
`roof` = bytes / measured copy bandwidth; `%roof` = roof / time. SDPA's own
share of its floor (bf16 K + V) is given beside it.

Append table: one new token of a layer (K and V, one qaqp.append call), B=1,
H_kv=8, D=128, bf16, CUDA-graph replay; target <= 5 us per layer.

Usage:  python benchmarks/bench_qaqp.py [--out benchmarks/results] [--quick] [--no-gpu] [--no-cpu]
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

from kvsparse import qaq, qaqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_header, gpu_header, hbm_bandwidth, run_benchmark, time_cpu, time_graph  # noqa: E402

#: name -> ((key widths, probabilities), (value widths, probabilities))
MIXES = {
    "4": (((4,), (1.0,)), ((4,), (1.0,))),
    "8": (((8,), (1.0,)), ((8,), (1.0,))),
    "default (SmolLM2 shares)": (((4, 8), (0.529, 0.471)), ((2, 4, 8), (0.866, 0.090, 0.044))),
}
N_OUT = 2
CHUNK = 8192


def draw(B, Hkv, S, mix, gen):
    ws, ps = mix
    idx = torch.multinomial(torch.tensor(ps), B * Hkv * S, replacement=True, generator=gen)
    return torch.tensor(ws, dtype=torch.uint8)[idx].view(B, Hkv, S)


def build(B, Hkv, S, D, name, seed, device, dtype=torch.bfloat16):
    """A store holding S tokens per (sequence, KV head) at widths drawn from MIXES[name];
    returns (store, bytes the attention reads)."""
    gen = torch.Generator().manual_seed(seed)
    kmix, vmix = MIXES[name]
    wk, wv = draw(B, Hkv, S, kmix, gen), draw(B, Hkv, S, vmix, gen)
    arena = 0
    read = 0
    ds = torch.empty((), dtype=dtype).element_size()
    for a in qaqp.WIDTHS:
        for b in qaqp.WIDTHS:
            n = ((wk == a) & (wv == b)).view(B * Hkv, S).sum(1)
            if int(n.sum()) == 0:
                continue
            pages = (-(-n // qaqp.PAGE)).sum().item()
            arena += pages * qaqp.page_bytes(D, a, b, N_OUT, N_OUT, dtype)
            per_tok = qaqp._stride(D, a) + qaqp._stride(D, b) + 8 + 2 * N_OUT * (2 + ds)
            read += int(n.sum()) * per_tok + 16 * pages
    st = qaqp.alloc(B, Hkv, D, S, dtype=dtype, device=device, n_out_k=N_OUT, n_out_v=N_OUT,
                    arena_bytes=arena + 16)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    for s0 in range(0, S, CHUNK):
        n = min(CHUNK, S - s0)
        k = torch.randn(B, Hkv, n, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, Hkv, n, D, device=device, dtype=dtype, generator=g)
        qaqp.append(st, k, v, wk[:, :, s0:s0 + n].contiguous().to(device), wv[:, :, s0:s0 + n].contiguous().to(device),
                    torch.full((B,), s0, dtype=torch.int32, device=device))
        del k, v
    qaqp.check(st)
    return st, read


def _mean_bits(name):
    (kw, kp), (vw, vp) = MIXES[name]
    return sum(w * p for w, p in zip(kw, kp)), sum(w * p for w, p in zip(vw, vp))


# ------------------------------------------------------------------- GPU ----
def gpu_table(quick=False):
    dev, H, Hkv, D, dtype = "cuda", 32, 8, 128, torch.bfloat16
    bw = hbm_bandwidth()
    points = [(1, 32768), (8, 32768)] if quick else [(1, 32768), (8, 32768), (1, 131072), (8, 131072)]
    mixes = ["4", "default (SmolLM2 shares)"] if quick else list(MIXES)
    rows = []
    for B, S in points:
        kv_bytes = 2 * B * Hkv * S * D * 2
        torch.cuda.empty_cache()
        nbuf = max(1, math.ceil((512 << 20) / kv_bytes))
        gen = torch.Generator(device=dev).manual_seed(B * S)
        dbufs = [(torch.randn(B, H, 1, D, device=dev, dtype=dtype, generator=gen),
                  torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, generator=gen),
                  torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, generator=gen)) for _ in range(nbuf)]

        def dense_fn(i):
            q, k, v = dbufs[i % nbuf]
            return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        t_dense = time_graph([dense_fn(i) for i in range(max(nbuf, 8))])
        dbufs = None
        torch.cuda.empty_cache()
        for name in mixes:
            bufs = []
            while True:
                st, read = build(B, Hkv, S, D, name, 100 * len(bufs) + 7, dev)
                bufs.append((torch.randn(B, H, D, device=dev, dtype=dtype), st))
                if len(bufs) * read >= (512 << 20) or len(bufs) >= 32:
                    break
            nb = len(bufs)

            def fn(i):
                q, st = bufs[i % nb]
                return lambda: qaqp.attention(q, st)

            t = time_graph([fn(i) for i in range(max(nb, 8))])
            # accuracy against SDPA over the dequantized pages (float32)
            q0, st0 = bufs[0]
            err = float("nan")
            if B * S <= 32768:
                kd, vd, pos = qaqp.dequantize(st0)
                bias = torch.where(pos >= 0, 0.0, float("-inf"))[:, :, None, None, :].float()
                ref = F.scaled_dot_product_attention(
                    q0.float().view(B, Hkv, H // Hkv, 1, D), kd.float()[:, :, None], vd.float()[:, :, None],
                    attn_mask=bias).view(B, H, D)
                got = qaqp.attention(q0, st0).float()
                err = ((got - ref).norm() / ref.norm()).item()
                del kd, vd, pos, bias, ref
            t_old = float("nan")
            if name == "4" and B == 1 and S == 32768:
                ks = qaq.alloc(B, Hkv, S, D, dtype, dev, alpha=0.01)
                vs = qaq.alloc(B, Hkv, S, D, dtype, dev, alpha=0.01)
                x = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
                p0 = torch.zeros(B, dtype=torch.int32, device=dev)
                offs, _ = qaq.packed_offsets(torch.full((B, Hkv, S), 4, dtype=torch.uint8, device=dev), D)
                qaq.quantize(ks, x, p0, 4, offs)
                qaq.quantize(vs, x, p0, 4, offs)
                sl = torch.full((B,), S, dtype=torch.int32, device=dev)
                q = bufs[0][0]
                t_old = time_graph([lambda: qaq.attention(q, ks, vs, sl)] * 8)
                del ks, vs, x
            roof = read / bw * 1e3
            dense_roof = kv_bytes / bw * 1e3
            mk, mv = _mean_bits(name)
            rows.append(dict(B=B, S=S, w=name, mk=mk, mv=mv, dense=t_dense, qaqp=t, old=t_old, roof=roof,
                             dense_roof=dense_roof, mb=read / 2**20, dense_mb=kv_bytes / 2**20, err=err))
            print(f"B={B} S={S} w={name}: dense {t_dense * 1e3:.1f} us ({100 * dense_roof / t_dense:.0f}% of its floor), "
                  f"qaqp {t * 1e3:.1f} us ({t_dense / t:.2f}x, {100 * roof / t:.0f}% of {roof * 1e3:.1f} us), "
                  f"old {t_old * 1e3:.1f} us, rel.err {err:.1e}", flush=True)
            bufs = None
            torch.cuda.empty_cache()
    return bw, rows


def gpu_markdown(bw, rows):
    lines = gpu_header(bw) + [
        "",
        "H=32, H_kv=8, D=128, bf16, 2 outliers per token (K and V). Times in us (CUDA-graph medians).",
        "`x SDPA`: dense time / qaqp time. `%roof`: the byte floor / time.",
        "",
        "| B | S | widths (K / V mean bits) | SDPA us | SDPA %roof | qaqp us | x SDPA | qaqp MiB | qaqp %roof | "
        "old format us | rel. err |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        old = f"{r['old'] * 1e3:.1f}" if r["old"] == r["old"] else "-"
        lines.append(
            f"| {r['B']} | {r['S']} | {r['w']} ({r['mk']:.2f} / {r['mv']:.2f}) | {r['dense'] * 1e3:.1f} | "
            f"{100 * r['dense_roof'] / r['dense']:.0f}% | {r['qaqp'] * 1e3:.1f} | {r['dense'] / r['qaqp']:.2f}x | "
            f"{r['mb']:.0f} | {100 * r['roof'] / r['qaqp']:.0f}% | {old} | {r['err']:.1e} |")
    return "\n".join(lines)


def append_table():
    dev, B, Hkv, D, dtype = "cuda", 1, 8, 128, torch.bfloat16
    st = qaqp.alloc(B, Hkv, D, 8192, dtype=dtype, device=dev, widths=(8, 8))
    k = torch.randn(B, Hkv, 1, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, 1, D, device=dev, dtype=dtype)
    p0 = torch.zeros(B, dtype=torch.int32, device=dev)
    wk = torch.full((B, Hkv, 1), 8, dtype=torch.uint8, device=dev)
    one = torch.ones(B, dtype=torch.int32, device=dev)

    def step():
        qaqp.append(st, k, v, wk, wk, p0, one)

    t = time_graph([step] * 32) * 1e3
    qaqp.check(st)
    print(f"append one token (K+V) B=1 H_kv=8: {t:.2f} us per layer", flush=True)
    return "\n".join([
        "One new token of a layer (K and V in one qaqp.append), B=1, H_kv=8, D=128, bf16, width 8, 2 outliers.",
        "CUDA-graph replay of 32 appends, median per append. Target: <= 5 us per layer.", "",
        "| us per layer |", "|---:|", f"| {t:.2f} |"])


# ------------------------------------------------------------------- CPU ----
def cpu_table(quick=False):
    H, Hkv, D, dtype = 8, 2, 128, torch.float32
    rows = []
    for S in ([2048] if quick else [2048, 8192]):
        torch.manual_seed(S)
        k = torch.randn(1, Hkv, S, D, dtype=dtype)
        v = torch.randn(1, Hkv, S, D, dtype=dtype)
        q = torch.randn(1, H, 1, D, dtype=dtype)
        t_dense = time_cpu(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        for name in (["4"] if quick else list(MIXES)):
            st, _ = build(1, Hkv, S, D, name, 5, "cpu", dtype)
            t = time_cpu(lambda: qaqp.attention(q[:, :, 0].contiguous(), st))
            rows.append((S, name, t_dense, t))
            print(f"CPU S={S} w={name}: dense {t_dense:.3f} ms qaqp {t:.3f} ms", flush=True)
    lines = [cpu_header(), "", "B=1, H=8, H_kv=2, D=128, fp32. Wall-clock medians in ms.", "",
             "| S | widths | dense SDPA (CPU) | qaqp | speedup |", "|---:|---|---:|---:|---:|"]
    for S, name, td, t in rows:
        lines.append(f"| {S} | {name} | {td:.3f} | {t:.3f} | {td / t:.2f}x |")
    return "\n".join(lines)


def _gpu_sections(quick):
    bw, rows = gpu_table(quick)
    return [gpu_markdown(bw, rows), "", "### Decode-step append", "", append_table(), ""]


def main():
    run_benchmark("qaqp", "QAQ pages", _gpu_sections, cpu_table)


if __name__ == "__main__":
    main()
