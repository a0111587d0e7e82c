"""A few launches of the fused QAQ decode attention, for Nsight Compute.

B=1, H=32, H_kv=8, D=128, S=32k, fp16, 4-bit packed caches (compact layout).
Usage: ncu --kernel-name regex:qa_attn python benchmarks/profile_qaq.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qaq import MIXES, build_store  # noqa: E402
from kvsparse import qaq  # noqa: E402


def main():
    B, H, Hkv, S, D = 1, 32, 8, 32768, 128
    ks = build_store(B, Hkv, S, D, MIXES["4"], 1, "cuda")
    vs = build_store(B, Hkv, S, D, MIXES["4"], 2, "cuda")
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
    sl = torch.full((B,), S, dtype=torch.int32, device="cuda")
    for _ in range(3):
        qaq.attention(q, ks, vs, sl)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
