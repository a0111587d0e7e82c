"""Benchmark of the fused SparQ decode op against dense attention.

GPU table: B in {1, 16}, H=32, H_kv in {32, 8}, D=128, fp16, S in {4k, 16k,
32k, 128k}, r in {8, 16, 32}, k in {S/8, S/16}. For each point, in the same run:
  * dense  torch.nn.functional.scaled_dot_product_attention (one decode query),
  * sparq  kvsparse.sparq.attention (top-r channels, approximate scores from
           the channel-major key copy, top-k positions, exact attention over
           them, mean-value reallocation),
  * torch  a plain-PyTorch SparQ (the same algorithm written with torch ops).
Times are CUDA-event medians of CUDA-graph replays that rotate over several
copies of the cache (so the caches never sit in L2), divided by the calls per
graph. Bytes are the fewest the op must read: r rows of the channel-major key
copy (r * S per KV head) and K, V at the k kept positions (2 * k * D per KV
head), in group mode (one i1/i2 per KV head). The fused op also writes and
re-reads the float32 approximate probabilities (4 * H * S bytes each way),
listed separately. `%roof` = bytes / copy bandwidth / time.

CPU table: smaller shapes, fused op vs torch's CPU SDPA, wall-clock medians.

Usage:  python benchmarks/bench_sparq.py [--out benchmarks/results] [--quick]
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

from kvsparse import sparq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_header, gpu_header, hbm_bandwidth, run_benchmark, time_cpu, time_eager, time_graph  # noqa: E402


def torch_sparq(q, k, v, kt, v_mean, r, k_top, reallocate=True):
    """Plain-PyTorch SparQ, group mode, every sequence full (seq_len = cap)."""
    B, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.view(B, Hkv, G, D)
    i1 = qg.abs().float().sum(2).topk(r, dim=-1).indices  # [B, Hkv, r]
    q1 = torch.gather(qg, 3, i1[:, :, None, :].expand(B, Hkv, G, r))  # [B, Hkv, G, r]
    k1 = torch.gather(kt, 2, i1[..., None].expand(B, Hkv, r, S))  # [B, Hkv, r, S]
    tau = torch.sqrt(D * q1.abs().float().sum(-1) / qg.abs().float().sum(-1))  # [B, Hkv, G]
    s_hat = (torch.matmul(q1, k1).float() / tau[..., None]).softmax(-1)  # [B, Hkv, G, S]
    i2 = s_hat.sum(2).topk(k_top, dim=-1).indices  # [B, Hkv, k]
    kk = torch.gather(k, 2, i2[..., None].expand(B, Hkv, k_top, D))
    vv = torch.gather(v, 2, i2[..., None].expand(B, Hkv, k_top, D))
    y = F.scaled_dot_product_attention(qg, kk, vv).float()  # [B, Hkv, G, D]
    if reallocate:
        alpha = torch.gather(s_hat, 3, i2[:, :, None, :].expand(B, Hkv, G, k_top)).sum(-1, keepdim=True)
        y = alpha * y + (1 - alpha) * v_mean[:, :, None, :]
    return y.reshape(B, H, D).to(q.dtype)


def n_copies(B, S, Hkv, D, r, k_top, elem=2):
    """Cache copies so that neither dense nor SparQ reads can be served from the 50 MB L2."""
    kv = 2 * B * S * Hkv * D * elem
    sparse = B * Hkv * (r * S + 2 * k_top * D) * elem
    return max(1, math.ceil((512 << 20) / kv), math.ceil((256 << 20) / sparse))


# ------------------------------------------------------------------- GPU ----
def gpu_table(quick=False):
    dev = "cuda"
    bw = hbm_bandwidth()
    H, D, dtype = 32, 128, torch.float16
    if quick:
        points = [(1, 32, 32768), (1, 8, 32768)]
        rs, kdivs = [16], [16]
    else:
        points = [(B, Hkv, S) for B in (1, 16) for Hkv in (32, 8) for S in (4096, 16384, 32768, 131072)]
        rs, kdivs = [8, 16, 32], [8, 16]
    rows = []
    for B, Hkv, S in points:
        kv_bytes = 2 * B * S * Hkv * D * 2
        free = torch.cuda.mem_get_info()[0]
        nbuf = min(n_copies(B, S, Hkv, D, 8, S // 16), max(1, int(0.6 * free) // int(1.5 * kv_bytes)))
        R = max(nbuf, 8)
        torch.manual_seed(B * S + Hkv)
        bufs = []
        try:
            for _ in range(nbuf):
                k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
                v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
                sl = torch.full((B,), S, dtype=torch.int32, device=dev)
                kt, v_mean = sparq.build(k, v, sl)
                q = torch.randn(B, H, D, device=dev, dtype=dtype)
                bufs.append((q, k, v, kt, v_mean, sl))
            del k, v, kt, v_mean
        except torch.cuda.OutOfMemoryError:
            print(f"B={B} Hkv={Hkv} S={S}: the cache (K, V and the key copy) does not fit: skipped", flush=True)
            bufs = None
            torch.cuda.empty_cache()
            continue

        def dense_fn(i):
            q, k, v = bufs[i % nbuf][:3]
            return lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=(Hkv != H))

        t_dense = time_graph([dense_fn(i) for i in range(R)])
        for r in rs:
            for kdiv in kdivs:
                k_top = S // kdiv

                def sparq_fn(i):
                    q, k, v, kt, vm, sl = bufs[i % nbuf]
                    return lambda: sparq.attention(q, k, v, kt, vm, sl, r=r, k_top=k_top)

                def torch_fn(i):
                    q, k, v, kt, vm, sl = bufs[i % nbuf]
                    return lambda: torch_sparq(q, k, v, kt, vm, r, k_top)

                b0 = bufs[0]
                try:
                    ref = torch_sparq(*b0[:5], r, k_top)
                except torch.cuda.OutOfMemoryError:
                    ref = None
                    torch.cuda.empty_cache()
                got = sparq.attention(*b0, r=r, k_top=k_top)
                err = float("nan") if ref is None else ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                del ref, got
                t_s = time_graph([sparq_fn(i) for i in range(R)])
                t_s_eager = time_eager([sparq_fn(i) for i in range(R)])
                try:
                    t_t = time_graph([torch_fn(i) for i in range(R)])
                except Exception:  # capture can fail; or out of memory
                    torch.cuda.empty_cache()
                    try:
                        t_t = time_eager([torch_fn(i) for i in range(R)])
                    except torch.cuda.OutOfMemoryError:
                        t_t = float("nan")
                nbytes = B * Hkv * (r * S + 2 * k_top * D) * 2
                shat_bytes = 2 * B * H * S * 4
                t_roof = nbytes / bw * 1e3
                rows.append(dict(B=B, Hkv=Hkv, S=S, r=r, k=k_top, dense=t_dense, sparq=t_s, eager=t_s_eager,
                                 torch=t_t, mb=nbytes / 2**20, shat_mb=shat_bytes / 2**20, roof=t_roof,
                                 err=err, byte_ratio=kv_bytes / nbytes))
                print(f"B={B:2d} Hkv={Hkv:2d} S={S:6d} r={r:2d} k=S/{kdiv}: dense {t_dense:.4f} ms, "
                      f"sparq {t_s:.4f} ms ({t_dense / t_s:.2f}x, roofline {t_roof:.4f} ms), eager {t_s_eager:.4f}, "
                      f"torch-sparq {t_t:.4f} ms, rel.err vs torch-sparq {err:.1e}", flush=True)
        del bufs
        torch.cuda.empty_cache()
    return bw, rows


def gpu_markdown(bw, rows):
    lines = gpu_header(bw) + [
        "",
        "H=32, D=128, fp16, mode \"group\", reallocation on, local_window 0. Times in ms (CUDA-graph replay, median).",
        "`speedup` = dense / sparq; `bytes` = r key-copy rows + K/V at k positions (MiB); `s_hat` = float32",
        "approximate probabilities written and re-read (MiB, not in `bytes`); `roof` = bytes / copy bandwidth;",
        "`%roof` = roof / sparq time; `eager` = one Python call per step; `rel.err` = vs the plain-PyTorch SparQ",
        "(which rounds its approximate logits in fp16, changing a few kept positions; the kernels are checked",
        "against a float64 reference in tests/test_sparq.py).",
        "",
        "| B | H_kv | S | r | k | dense SDPA | sparq (fused) | speedup | byte ratio | bytes MiB | s_hat MiB | roof | %roof | eager | plain-PyTorch SparQ | sparq vs torch-SparQ | rel.err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        lines.append(f"| {x['B']} | {x['Hkv']} | {x['S']} | {x['r']} | {x['k']} | {x['dense']:.4f} | {x['sparq']:.4f} | "
                     f"{x['dense'] / x['sparq']:.2f}x | {x['byte_ratio']:.1f}x | {x['mb']:.1f} | {x['shat_mb']:.1f} | "
                     f"{x['roof']:.4f} | {100 * x['roof'] / x['sparq']:.0f}% | {x['eager']:.4f} | {x['torch']:.4f} | "
                     f"{x['torch'] / x['sparq']:.1f}x | {x['err']:.1e} |")
    return "\n".join(lines)


# ------------------------------------------------------------------- CPU ----
def cpu_table(quick=False):
    H, D, dtype = 8, 128, torch.float32
    rows = []
    for Hkv in (8, 2):
        for S in ([2048] if quick else [2048, 8192]):
            torch.manual_seed(S)
            k = torch.randn(1, Hkv, S, D, dtype=dtype)
            v = torch.randn(1, Hkv, S, D, dtype=dtype)
            q = torch.randn(1, H, D, dtype=dtype)
            sl = torch.full((1,), S, dtype=torch.int32)
            kt, vm = sparq.build(k, v, sl)
            t_dense = time_cpu(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=(Hkv != H)))
            for r, kdiv in ((16, 16), (32, 8)):
                t_s = time_cpu(lambda: sparq.attention(q, k, v, kt, vm, sl, r=r, k_top=S // kdiv))
                rows.append((Hkv, S, r, S // kdiv, t_dense, t_s))
                print(f"CPU Hkv={Hkv} S={S} r={r} k={S // kdiv}: dense {t_dense:.3f} ms sparq {t_s:.3f} ms", flush=True)
    lines = [cpu_header(), "", "B=1, H=8, D=128, fp32, group mode. Wall-clock medians in ms.", "",
             "| H_kv | S | r | k | dense SDPA (CPU) | sparq (fused) | speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for Hkv, S, r, k_top, td, ts in rows:
        lines.append(f"| {Hkv} | {S} | {r} | {k_top} | {td:.3f} | {ts:.3f} | {td / ts:.2f}x |")
    return "\n".join(lines)


def _gpu_sections(quick):
    bw, rows = gpu_table(quick)
    return [gpu_markdown(bw, rows), ""]


def main():
    run_benchmark("sparq", "SparQ", _gpu_sections, cpu_table)


if __name__ == "__main__":
    main()
