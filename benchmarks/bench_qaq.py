"""Benchmark of the fused QAQ decode attention (packed per-token-width cache)
against dense attention.

GPU table: B in {1, 16}, H=32, H_kv in {8, 32}, D=128, fp16, S in {4k, 32k,
128k}, mean widths of about 2 bits (widths drawn from {1, 2, 4} with
probabilities 1/2, 1/4, 1/4), 4 and 8 bits, alpha = 0.01 (2 outlier slots per
group), per-head groups in the compact (packed) layout. For each point, in
the same run:
  * dense  torch.nn.functional.scaled_dot_product_attention over fp16 K, V
           (one decode query, enable_gqa),
  * qaq    kvsparse.qaq.attention over the packed K and V stores.
Times are CUDA-event medians of CUDA-graph replays that rotate over several
copies of the caches (so they never sit in L2), divided by the calls per
graph. Bytes: what the fused op must read, per token and KV head, for K and
V each: D * w / 8 code bytes + 4 (offset) + 1 (width) + 4 (scale, zero) +
n_out * (2 + 2) outlier bytes (qaq.memory_report's true bytes);
`roof` = bytes / copy bandwidth; `%roof` = roof / time. Points that do not
fit in memory are skipped.

Memory table: bytes actually allocated (torch.cuda.memory_allocated delta)
for a 32k-token cache (B=1, H_kv=8, D=128, K and V) at each width mix against
an fp16 cache, beside memory_report's true bytes.

Quantize table: the decode step's qaq.quantize of one new token into a layer's
K and V stores (B=1, D=128, bf16, the Llama-3-8B shape H_kv=8 with shared
groups and alpha=0.02 first: E=1024, 22 outlier slots; target <= 10 us per
layer), CUDA-graph replay and eager.

CPU table: smaller shapes, fused op vs torch's CPU SDPA, wall-clock medians.

Usage:  python benchmarks/bench_qaq.py [--out benchmarks/results] [--quick] [--no-gpu] [--no-cpu]
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

from kvsparse import qaq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_header, gpu_header, hbm_bandwidth, run_benchmark, time_cpu, time_eager, time_graph  # noqa: E402

#: width mixes: name -> (widths, probabilities), or a (keys, values) pair of them
MIXES = {
    "2 (1/2/4 mix)": ((1, 2, 4), (0.5, 0.25, 0.25)),
    "4": ((4,), (1.0,)),
    "8": ((8,), (1.0,)),
    # the default config's widths on SmolLM2 (benchmarks/results/qaq_widths_smollm2_cpu.md):
    # keys 4/8 bits, values mostly 2
    "default (SmolLM2 replay)": (((4, 8), (0.529, 0.471)), ((2, 4, 8), (0.866, 0.090, 0.044))),
    # the same shares drawn per 16-token tile (tile_widths=16: one K and one V width per tile)
    "default, 16-token tiles": (((4, 8), (0.529, 0.471)), ((2, 4, 8), (0.866, 0.090, 0.044))),
}


def kv_mixes(mix):
    """(keys mix, values mix) of a MIXES entry."""
    return mix if isinstance(mix[0][0], tuple) else (mix, mix)
ALPHA = 0.01
CHUNK = 8192  # tokens quantized per call while building a store


#: mixes drawn per aligned tile of this many tokens (QAQConfig.tile_widths), not per token
TILED = {"default, 16-token tiles": 16}


def draw_widths(B, Hkv, S, mix, gen, device, tile=1):
    ws, ps = mix
    if len(ws) == 1:
        return torch.full((B, Hkv, S), ws[0], dtype=torch.uint8, device=device)
    n = -(-S // tile)
    idx = torch.multinomial(torch.tensor(ps), B * Hkv * n, replacement=True, generator=gen)
    w = torch.tensor(ws, dtype=torch.uint8)[idx].view(B, Hkv, n).repeat_interleave(tile, dim=2)[:, :, :S]
    return w.contiguous().to(device)


def build_store(B, Hkv, S, D, mix, seed, device, dtype=torch.float16, tile=1):
    """A packed (compact-layout) store with every token of [0, S) quantized at
    widths drawn from `mix` (one draw per `tile` tokens)."""
    gen = torch.Generator().manual_seed(seed)
    widths = draw_widths(B, Hkv, S, mix, gen, device, tile)
    offs, nbytes = qaq.packed_offsets(widths, D)
    st = qaq.alloc(B, Hkv, S, D, dtype, device, alpha=ALPHA, arena_bytes=max(int(nbytes.max()), 1))
    g = torch.Generator(device=device).manual_seed(seed + 1)
    for s0 in range(0, S, CHUNK):
        n = min(CHUNK, S - s0)
        x = torch.randn(B, Hkv, n, D, device=device, dtype=dtype, generator=g)
        pos = torch.full((B,), s0, dtype=torch.int32, device=device)
        qaq.quantize(st, x, pos, widths[:, :, s0:s0 + n].contiguous(), offs[:, :, s0:s0 + n].contiguous())
        del x
    return st


def true_bytes(st, sl):
    return qaq.memory_report(st, sl)["total"]


def store_alloc_bytes(st):
    return sum(t.numel() * t.element_size() for t in st.tensors())


def mean_width(st, sl):
    rep = qaq.memory_report(st, sl)
    n = int(sl.clamp(0, st.cap).sum()) * st.groups * st.group_elems
    return 8.0 * rep["codes"] / n if n else 0.0


# ------------------------------------------------------------------- GPU ----
def gpu_table(quick=False):
    dev = "cuda"
    bw = hbm_bandwidth()
    H, D, dtype = 32, 128, torch.float16
    if quick:
        points = [(1, 8, 32768), (16, 8, 4096)]
        mixes = ["4", "default (SmolLM2 replay)", "default, 16-token tiles"]
    else:
        points = [(B, Hkv, S) for B in (1, 16) for Hkv in (8, 32) for S in (4096, 32768, 131072)]
        mixes = list(MIXES)
    rows = []
    for B, Hkv, S in points:
        kv_bytes = 2 * B * S * Hkv * D * 2
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        # dense: enough copies that the rotation never hits L2, as many as fit
        nbuf = max(1, min(math.ceil((512 << 20) / kv_bytes), int(0.6 * free) // int(1.2 * kv_bytes)))
        torch.manual_seed(B * S + Hkv)
        try:
            if kv_bytes * 1.2 > free:
                raise torch.cuda.OutOfMemoryError("dense K, V do not fit")
            dbufs = [(torch.randn(B, H, D, device=dev, dtype=dtype),
                      torch.randn(B, Hkv, S, D, device=dev, dtype=dtype),
                      torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)) for _ in range(nbuf)]
            R = max(nbuf, 8)

            def dense_fn(i):
                q, k, v = dbufs[i % nbuf]
                return lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=(Hkv != H))

            t_dense = time_graph([dense_fn(i) for i in range(R)])
        except torch.cuda.OutOfMemoryError:
            t_dense = float("nan")
        dbufs = None
        torch.cuda.empty_cache()
        for name in mixes:
            sbufs = []
            try:
                st_bytes = None
                free = torch.cuda.mem_get_info()[0]
                while True:
                    i = len(sbufs)
                    kmix, vmix = kv_mixes(MIXES[name])
                    ks = build_store(B, Hkv, S, D, kmix, 1000 * i + 1, dev, tile=TILED.get(name, 1))
                    vs = build_store(B, Hkv, S, D, vmix, 1000 * i + 2, dev, tile=TILED.get(name, 1))
                    sl = torch.full((B,), S, dtype=torch.int32, device=dev)
                    q = torch.randn(B, H, D, device=dev, dtype=dtype)
                    sbufs.append((q, ks, vs, sl))
                    st_bytes = true_bytes(ks, sl) + true_bytes(vs, sl)
                    alloc = store_alloc_bytes(ks) + store_alloc_bytes(vs)
                    if len(sbufs) * st_bytes >= (512 << 20) or len(sbufs) >= 64 or \
                            torch.cuda.mem_get_info()[0] < 3 * alloc + (2 << 30):
                        break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if not sbufs:
                    print(f"B={B} Hkv={Hkv} S={S} w={name}: the packed cache does not fit: skipped", flush=True)
                    continue
            nb = len(sbufs)
            R = max(nb, 8)
            q0, k0, v0, sl0 = sbufs[0]
            wk = mean_width(k0, sl0)
            wv = mean_width(v0, sl0)

            def qaq_fn(i):
                q, ks, vs, sl = sbufs[i % nb]
                return lambda: qaq.attention(q, ks, vs, sl)

            def qaq_pm_fn(i):
                q, ks, vs, sl = sbufs[i % nb]
                return lambda: qaq.attention(q, ks, vs, sl, return_p_max=True)

            try:
                t_q = time_graph([qaq_fn(i) for i in range(R)])
                t_pm = time_graph([qaq_pm_fn(i) for i in range(R)])
                t_eager = time_eager([qaq_fn(i) for i in range(R)])
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"B={B} Hkv={Hkv} S={S} w={name}: out of memory while timing: skipped", flush=True)
                sbufs = None
                continue
            # accuracy against dense attention over the dequantized cache (small points only)
            err = float("nan")
            if B * Hkv * S <= 8 * 32768:
                kd, vd = qaq.dequantize(k0, sl0), qaq.dequantize(v0, sl0)
                ref = F.scaled_dot_product_attention(q0[:, :, None].float(), kd.float(), vd.float(),
                                                     enable_gqa=(Hkv != H))[:, :, 0]
                got = qaq.attention(q0, k0, v0, sl0).float()
                err = ((got - ref).norm() / ref.norm()).item()
                del kd, vd, ref, got
            t_roof = st_bytes / bw * 1e3
            rows.append(dict(B=B, Hkv=Hkv, S=S, w=name, wk=wk, wv=wv, dense=t_dense, qaq=t_q, pm=t_pm,
                             eager=t_eager, mb=st_bytes / 2**20, dense_mb=kv_bytes / 2**20, roof=t_roof,
                             err=err))
            print(f"B={B:2d} Hkv={Hkv:2d} S={S:6d} w={name:14s} (mean {wk:.2f}/{wv:.2f}): dense {t_dense:.4f} ms, "
                  f"qaq {t_q:.4f} ms ({t_dense / t_q:.2f}x; roofline {t_roof:.4f} ms, "
                  f"{100 * t_roof / t_q:.0f}%), +p_max {t_pm:.4f} ms, eager {t_eager:.4f} ms, rel.err {err:.1e}",
                  flush=True)
            sbufs = None
            torch.cuda.empty_cache()
    return bw, rows


def gpu_markdown(bw, rows):
    lines = gpu_header(bw) + [
        "",
        "H=32, D=128, fp16, alpha=0.01 (2 outlier slots per group), per-head groups, compact layout.",
        "Times in ms (CUDA-graph replay, median, caches rotated out of L2). `speedup` = dense / qaq;",
        "`bytes` = K + V bytes the fused op reads (codes + offset + width + scale/zero + outliers, MiB);",
        "`byte ratio` = fp16 K + V bytes / `bytes`; `roof` = bytes / copy bandwidth; `%roof` = roof / qaq;",
        "`+p_max` = the op also returning p_max; `eager` = one Python call per step;",
        "`rel.err` = vs float32 SDPA over the dequantized cache (checked where B * H_kv * S <= 256k: n/a above).",
        "",
        "| B | H_kv | S | width (mean K/V) | dense SDPA | qaq (fused) | speedup | byte ratio | bytes MiB | roof | %roof | +p_max | eager | rel.err |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        lines.append(f"| {x['B']} | {x['Hkv']} | {x['S']} | {x['w']} ({x['wk']:.2f}/{x['wv']:.2f}) | "
                     f"{x['dense']:.4f} | {x['qaq']:.4f} | {x['dense'] / x['qaq']:.2f}x | "
                     f"{x['dense_mb'] / x['mb']:.2f}x | {x['mb']:.1f} | {x['roof']:.4f} | "
                     f"{100 * x['roof'] / x['qaq']:.0f}% | {x['pm']:.4f} | {x['eager']:.4f} | "
                     f"{'n/a' if x['err'] != x['err'] else format(x['err'], '.1e')} |")
    return "\n".join(lines)


def memory_table(quick=False):
    dev = "cuda"
    B, Hkv, S, D, dtype = 1, 8, 32768, 128, torch.float16
    sl = torch.full((B,), S, dtype=torch.int32, device=dev)
    rows = []
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    m0 = torch.cuda.memory_allocated()
    k = torch.empty(B, Hkv, S, D, device=dev, dtype=dtype)
    v = torch.empty(B, Hkv, S, D, device=dev, dtype=dtype)
    fp16 = torch.cuda.memory_allocated() - m0
    del k, v
    for name in (["4"] if quick else list(MIXES)):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        m0 = torch.cuda.memory_allocated()
        ks = build_store(B, Hkv, S, D, kv_mixes(MIXES[name])[0], 11, dev, tile=TILED.get(name, 1))
        vs = build_store(B, Hkv, S, D, kv_mixes(MIXES[name])[1], 12, dev, tile=TILED.get(name, 1))
        torch.cuda.synchronize()
        got = torch.cuda.memory_allocated() - m0
        rk, rv = qaq.memory_report(ks, sl), qaq.memory_report(vs, sl)
        rows.append((name, mean_width(ks, sl), got, rk["total"] + rv["total"], rk["codes"] + rv["codes"]))
        print(f"memory w={name}: allocated {got / 2**20:.2f} MiB, true {(rk['total'] + rv['total']) / 2**20:.2f} MiB, "
              f"fp16 {fp16 / 2**20:.2f} MiB", flush=True)
        del ks, vs
    lines = ["B=1, H_kv=8, D=128, S=32768 tokens, K and V, fp16 cache dtype, alpha=0.01, compact layout.",
             "`allocated` = torch.cuda.memory_allocated delta (arena + metadata tensors as allocated);",
             "`true` = qaq.memory_report totals (codes + offsets + widths + scale/zero + outliers).",
             "",
             "| width | mean K width | allocated MiB | true MiB | codes MiB | fp16 MiB | allocated / fp16 | true / fp16 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, w, got, true, codes in rows:
        lines.append(f"| {name} | {w:.2f} | {got / 2**20:.2f} | {true / 2**20:.2f} | {codes / 2**20:.2f} | "
                     f"{fp16 / 2**20:.2f} | {got / fp16:.3f} | {true / fp16:.3f} |")
    return "\n".join(lines)


def quantize_table(quick=False):
    """qaq.quantize of one new token into a layer's K and V stores (a decode step)."""
    dev, B, D, cap, dtype = "cuda", 1, 128, 4096, torch.bfloat16
    points = [(8, True, 0.02)] if quick else [(8, True, 0.02), (8, False, 0.02), (32, True, 0.01), (32, False, 0.01)]
    rows = []
    for Hkv, shared, alpha in points:
        ks = qaq.alloc(B, Hkv, cap, D, dtype, dev, alpha=alpha, shared=shared)
        vs = qaq.alloc(B, Hkv, cap, D, dtype, dev, alpha=alpha, shared=shared)
        kn = torch.randn(B, Hkv, 1, D, device=dev, dtype=dtype)
        vn = torch.randn(B, Hkv, 1, D, device=dev, dtype=dtype)
        pos = torch.full((B,), 100, dtype=torch.int32, device=dev)
        wn = torch.full((B, ks.groups, 1), 8, dtype=torch.uint8, device=dev)
        offs = torch.gather(ks.offsets, 2, pos.long()[:, None, None].expand(B, ks.groups, 1)).contiguous()

        def kv():
            qaq.quantize(ks, kn, pos, wn, offs)
            qaq.quantize(vs, vn, pos, wn, offs)

        t_graph = time_graph([kv] * 32) * 1e3
        t_eager = time_eager([kv] * 8) * 1e3
        E, n_out = ks.group_elems, ks.oidx.shape[-1]
        rows.append((Hkv, shared, E, alpha, n_out, t_graph, t_eager))
        print(f"quantize K+V Hkv={Hkv} {'shared' if shared else 'head'} E={E} n_out={n_out}: "
              f"{t_graph:.2f} us per layer (graph), {t_eager:.2f} us (eager)", flush=True)
    lines = ["One new token into a layer's K and V stores (two qaq.quantize calls), B=1, D=128, bf16, width 8.",
             "Times in us per layer: CUDA-graph replay of 32 layers (median, per layer) and eager calls.",
             "Target: <= 10 us per layer at H_kv=8, shared, alpha=0.02.",
             "",
             "| H_kv | groups | E | alpha | n_out | graph us / layer | eager us / layer |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for Hkv, shared, E, alpha, n_out, tg, te in rows:
        lines.append(f"| {Hkv} | {'shared' if shared else 'per head'} | {E} | {alpha} | {n_out} | {tg:.2f} | {te:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------- CPU ----
def cpu_table(quick=False):
    H, D, dtype = 8, 128, torch.float32
    rows = []
    mixes = ["4"] if quick else ["2 (1/2/4 mix)", "4", "8"]
    for Hkv in ((2,) if quick else (8, 2)):
        for S in ([2048] if quick else [2048, 8192]):
            torch.manual_seed(S)
            k = torch.randn(1, Hkv, S, D, dtype=dtype)
            v = torch.randn(1, Hkv, S, D, dtype=dtype)
            q = torch.randn(1, H, D, dtype=dtype)
            t_dense = time_cpu(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=(Hkv != H)))
            for name in mixes:
                ks = build_store(1, Hkv, S, D, kv_mixes(MIXES[name])[0], 5, "cpu", dtype)
                vs = build_store(1, Hkv, S, D, kv_mixes(MIXES[name])[1], 6, "cpu", dtype)
                sl = torch.full((1,), S, dtype=torch.int32)
                t_q = time_cpu(lambda: qaq.attention(q, ks, vs, sl))
                rows.append((Hkv, S, name, t_dense, t_q))
                print(f"CPU Hkv={Hkv} S={S} w={name}: dense {t_dense:.3f} ms qaq {t_q:.3f} ms", flush=True)
    lines = [cpu_header(), "", "B=1, H=8, D=128, fp32, alpha=0.01, per-head groups. Wall-clock medians in ms.", "",
             "| H_kv | S | width | dense SDPA (CPU) | qaq (fused) | speedup |",
             "|---:|---:|---|---:|---:|---:|"]
    for Hkv, S, name, td, tq in rows:
        lines.append(f"| {Hkv} | {S} | {name} | {td:.3f} | {tq:.3f} | {td / tq:.2f}x |")
    return "\n".join(lines)


def _gpu_sections(quick):
    bw, rows = gpu_table(quick)
    return [gpu_markdown(bw, rows), ""] + ["### Memory", "", memory_table(quick), ""] + \
        ["### Decode-step quantize", "", quantize_table(quick), ""]


def main():
    run_benchmark("qaq", "QAQ", _gpu_sections, cpu_table)


if __name__ == "__main__":
    main()
