"""Where the fused Quest op spends its time: each stage timed alone.

Times page_scores, select_pages, sparse_attention and the fused op separately
(CUDA-graph replays over rotating cache copies, CUDA-event medians) so the sum
of the stages can be compared with the fused op and with each stage's bytes.
Usage: python benchmarks/profile_quest.py [--ncu]   (--ncu: a few launches only, for ncu)
"""
import argparse
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _common import hbm_bandwidth, time_graph  # noqa: E402
from bench_quest import n_copies  # noqa: E402
from kvsparse import quest  # noqa: E402

P = 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true")
    args = ap.parse_args()
    H, D, dt = 32, 128, torch.float16
    bw = None if args.ncu else hbm_bandwidth()
    if bw:
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    cases = [(32, 32768, 2048), (32, 131072, 2048), (8, 32768, 2048), (8, 131072, 2048), (32, 4096, 512)]
    for Hkv, S, budget in cases:
        nbuf = n_copies(S, Hkv, D, budget)
        R = max(nbuf, 8)
        bufs = []
        for i in range(nbuf):
            k = torch.randn(1, Hkv, S, D, device="cuda", dtype=dt)
            v = torch.randn_like(k)
            sl = torch.full((1,), S, dtype=torch.int32, device="cuda")
            kmin, kmax = quest.page_metadata(k, sl, P)
            q = torch.randn(1, H, D, device="cuda", dtype=dt)
            sc = quest.page_scores(q, kmin, kmax, sl, P, mode="group")
            idx = quest.select_pages(sc, sl, P, budget)
            bufs.append((q, k, v, kmin, kmax, sl, sc, idx))
        if args.ncu:
            q, k, v, kmin, kmax, sl, sc, idx = bufs[0]
            for _ in range(2):
                quest.attention(q, k, v, kmin, kmax, sl, P, budget)
            torch.cuda.synchronize()
            continue
        fns = {
            "scores": lambda b: (lambda: quest.page_scores(b[0], b[3], b[4], b[5], P, mode="group")),
            "select": lambda b: (lambda: quest.select_pages(b[6], b[5], P, budget)),
            "sparse_attn": lambda b: (lambda: quest.sparse_attention(b[0], b[1], b[2], b[7], b[5], P)),
            "fused": lambda b: (lambda: quest.attention(*b[:6], P, budget)),
        }
        meta = 2 * Hkv * (S // P) * D * 2
        sel = 2 * Hkv * budget * D * 2
        nbytes = {"scores": meta, "select": Hkv * (S // P) * 4, "sparse_attn": sel, "fused": meta + sel}
        line = f"Hkv={Hkv:2d} S={S:6d} budget={budget} copies={nbuf}:"
        for name, mk in fns.items():
            t = time_graph([mk(bufs[i % nbuf]) for i in range(R)])
            line += f"  {name} {t * 1e3:6.1f} us ({nbytes[name] / bw * 1e6:5.1f} roof)"
        print(line, flush=True)
        del bufs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
