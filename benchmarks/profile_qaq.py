"""A few launches of the fused QAQ decode attention, for Nsight Compute, or a
quick timing table (``--time``).

B=1, H=32, H_kv=8, D=128, S=32k, fp16, packed caches (compact layout).
Usage: ncu --kernel-name regex:qa_attn python benchmarks/profile_qaq.py
       python benchmarks/profile_qaq.py --time     (fused op vs dense SDPA, per mean width)
KVSPARSE_QA_BLOCKS=2|3|4 picks the kernel variant built for that many blocks per SM.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import time_graph  # noqa: E402
from bench_qaq import MIXES, build_store  # noqa: E402
from kvsparse import qaq  # noqa: E402

B, H, HKV, S, D = 1, 32, 8, 32768, 128


def main():
    ks = build_store(B, HKV, S, D, MIXES["4"], 1, "cuda")
    vs = build_store(B, HKV, S, D, MIXES["4"], 2, "cuda")
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
    sl = torch.full((B,), S, dtype=torch.int32, device="cuda")
    for _ in range(3):
        qaq.attention(q, ks, vs, sl)
    torch.cuda.synchronize()


def timing():
    sl = torch.full((B,), S, dtype=torch.int32, device="cuda")
    nb = 8
    dense = [(torch.randn(B, H, D, device="cuda", dtype=torch.float16),
              torch.randn(B, HKV, S, D, device="cuda", dtype=torch.float16),
              torch.randn(B, HKV, S, D, device="cuda", dtype=torch.float16)) for _ in range(nb)]
    t_d = time_graph([(lambda a=a: F.scaled_dot_product_attention(a[0][:, :, None], a[1], a[2], enable_gqa=True))
                      for a in dense])
    del dense
    row = [f"blocks={os.environ.get('KVSPARSE_QA_BLOCKS', 'default')}", f"dense {t_d * 1e3:.1f} us"]
    for name in MIXES:
        bufs = [(torch.randn(B, H, D, device="cuda", dtype=torch.float16),
                 build_store(B, HKV, S, D, MIXES[name], 10 * i + 1, "cuda"),
                 build_store(B, HKV, S, D, MIXES[name], 10 * i + 2, "cuda")) for i in range(nb)]
        t = time_graph([(lambda a=a: qaq.attention(a[0], a[1], a[2], sl)) for a in bufs])
        row.append(f"{name.split()[0]}-bit {t * 1e3:.1f} us ({t_d / t:.2f}x)")
    print(" | ".join(row), flush=True)


if __name__ == "__main__":
    timing() if "--time" in sys.argv else main()
