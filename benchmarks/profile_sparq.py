"""Where the fused SparQ op spends its time: each stage timed alone.

Times top_channels, approx_scores, top_positions, sparse_attention and the
fused op separately (CUDA-graph replays over rotating cache copies, CUDA-event
medians), beside each stage's fewest bytes over the copy bandwidth.
Usage: python benchmarks/profile_sparq.py [--ncu] [--quick] [--fused-only]
  --ncu: a few fused calls only, for ncu; --quick: the two 32k B=1 cases;
  --fused-only: the fused op alone (for A/B runs under KVSPARSE_NO_PDL=1,
  KVSPARSE_SPARQ_STEPS=1 or KVSPARSE_SPARQ_TC=1)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import hbm_bandwidth, time_graph  # noqa: E402
from bench_sparq import n_copies  # noqa: E402
from kvsparse import sparq  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fused-only", action="store_true")
    args = ap.parse_args()
    H, D, dt = 32, 128, torch.float16
    if args.ncu:
        for B, Hkv, S, r, k_top in [(1, 32, 32768, 16, 2048), (1, 8, 32768, 16, 2048)]:
            k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dt)
            v = torch.randn_like(k)
            sl = torch.full((B,), S, dtype=torch.int32, device="cuda")
            kt, vm = sparq.build(k, v, sl)
            q = torch.randn(B, H, D, device="cuda", dtype=dt)
            for _ in range(3):
                sparq.attention(q, k, v, kt, vm, sl, r=r, k_top=k_top)
            torch.cuda.synchronize()
        return
    bw = hbm_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    cases = [(1, 32, 32768, 16, 2048), (1, 8, 32768, 16, 2048), (1, 32, 131072, 16, 8192),
             (1, 32, 4096, 16, 256), (16, 8, 32768, 16, 2048)]
    if args.quick:
        cases = cases[:2]
    for B, Hkv, S, r, k_top in cases:
        G = H // Hkv
        nbuf = n_copies(B, S, Hkv, D, r, k_top)
        R = max(nbuf, 8)
        bufs = []
        for _ in range(nbuf):
            k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dt)
            v = torch.randn_like(k)
            sl = torch.full((B,), S, dtype=torch.int32, device="cuda")
            kt, vm = sparq.build(k, v, sl)
            q = torch.randn(B, H, D, device="cuda", dtype=dt)
            i1 = sparq.top_channels(q, r, G)
            s_hat = sparq.approx_scores(q, kt, i1, sl)
            i2 = sparq.top_positions(s_hat, sl, k_top, 0, G)
            bufs.append((q, k, v, kt, vm, sl, i1, s_hat, i2))
        fns = {
            "top_channels": lambda b: (lambda: sparq.top_channels(b[0], r, G)),
            "approx_scores": lambda b: (lambda: sparq.approx_scores(b[0], b[3], b[6], b[5])),
            "top_positions": lambda b: (lambda: sparq.top_positions(b[7], b[5], k_top, 0, G)),
            "sparse_attn": lambda b: (lambda: sparq.sparse_attention(b[0], b[1], b[2], b[8], b[7], b[4], b[5])),
            "fused": lambda b: (lambda: sparq.attention(*b[:6], r=r, k_top=k_top)),
        }
        kt_bytes = B * Hkv * r * S * 2
        kv_bytes = 2 * B * Hkv * k_top * D * 2
        nbytes = {"top_channels": B * H * D * 2, "approx_scores": kt_bytes + B * H * S * 4,
                  "top_positions": B * H * S * 4, "sparse_attn": kv_bytes, "fused": kt_bytes + kv_bytes}
        line = f"B={B:2d} Hkv={Hkv:2d} S={S:6d} r={r} k={k_top} copies={nbuf}:"
        for name, mk in fns.items():
            if args.fused_only and name != "fused":
                continue
            t = time_graph([mk(bufs[i % nbuf]) for i in range(R)])
            line += f"  {name} {t * 1e3:6.1f} us ({nbytes[name] / bw * 1e6:5.1f} roof)"
        print(line, flush=True)
        del bufs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
