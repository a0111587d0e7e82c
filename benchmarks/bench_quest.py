"""Benchmark of the fused Quest decode op against dense attention.

GPU table: B=1, H=32, H_kv in {32, 8}, D=128, fp16, S in {4k, 16k, 32k, 128k},
token budgets {512, 1024, 2048, 4096}. For each point, in the same run:
  * dense  torch.nn.functional.scaled_dot_product_attention (one decode query),
  * quest  kvsparse.quest.attention (scores + top-k pages + sparse attention),
  * torch  a plain-PyTorch Quest (the same algorithm written with torch ops).
Times are CUDA-event medians. Each timed region is a CUDA graph holding R
calls that rotate over several copies of the cache (so that the caches never
sit in L2), divided by R: this removes CPU launch overhead for every method
alike. The eager time of the fused op (one Python call, CPU dispatch
included) is reported too. Bytes are the fewest the op must read (page
metadata of the whole context + K and V of the selected pages); `%HBM` is
bytes / time over the device-to-device copy bandwidth measured in the run.

CPU table: smaller shapes, fused op vs torch's CPU SDPA, wall-clock medians.

Usage:  python benchmarks/bench_quest.py [--out benchmarks/results] [--quick]
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

from kvsparse import quest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_header, gpu_header, hbm_bandwidth, run_benchmark, time_cpu, time_eager, time_graph  # noqa: E402

P = 16


# ----------------------------------------------------------------- helpers --
def n_copies(S, Hkv, D, budget, elem=2):
    """Cache copies to rotate over so that neither dense (all of K and V) nor
    Quest (metadata + selected pages) can serve repeated calls from the 50 MB
    L2: at least 512 MiB of K/V and 256 MiB of Quest reads across the copies."""
    kv = 2 * S * Hkv * D * elem
    sparse = 2 * Hkv * (S // P) * D * elem + 2 * Hkv * budget * D * elem
    return max(1, math.ceil((512 << 20) / kv), math.ceil((256 << 20) / sparse))


def torch_quest(q, k, v, kmin, kmax, length, budget, group=True):
    """Plain-PyTorch Quest for one sequence of `length` tokens (B=1)."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    n_pages = (length + P - 1) // P
    n_sel = min(budget // P, n_pages)
    qg = q.view(B, Hkv, G, 1, D)
    mn = kmin[:, :, None, :n_pages]
    mx = kmax[:, :, None, :n_pages]
    s = torch.maximum(qg * mn, qg * mx).float().sum(-1)  # [B, Hkv, G, np]
    if group:
        s = s.sum(2, keepdim=True)  # [B, Hkv, 1, np]
    s[..., -1] = float("inf")  # always keep the last page
    idx = s.topk(n_sel, dim=-1).indices  # [B, Hkv, g, n_sel]
    tok = (idx[..., None] * P + torch.arange(P, device=q.device)).flatten(-2)  # [B,Hkv,g,n_sel*P]
    valid = tok < length
    tok = tok.clamp(max=length - 1)
    gsz = tok.shape[2]
    kk = torch.gather(k[:, :, None].expand(B, Hkv, gsz, -1, D), 3, tok[..., None].expand(-1, -1, -1, -1, D))
    vv = torch.gather(v[:, :, None].expand(B, Hkv, gsz, -1, D), 3, tok[..., None].expand(-1, -1, -1, -1, D))
    qq = q.view(B, Hkv, G, D) if group else q.view(B, Hkv, G, 1, D)
    if group:
        att = torch.einsum("bhgd,bhtd->bhgt", qq.float(), kk[:, :, 0].float()) / math.sqrt(D)
        att = att.masked_fill(~valid[:, :, 0, None, :], float("-inf")).softmax(-1)
        o = torch.einsum("bhgt,bhtd->bhgd", att, vv[:, :, 0].float())
    else:
        att = torch.einsum("bhgxd,bhgtd->bhgxt", qq.float(), kk.float()) / math.sqrt(D)
        att = att.masked_fill(~valid[:, :, :, None, :], float("-inf")).softmax(-1)
        o = torch.einsum("bhgxt,bhgtd->bhgxd", att, vv.float())
    return o.reshape(B, H, D).to(q.dtype)


# ------------------------------------------------------------------- GPU ----
def gpu_table(quick=False):
    dev = "cuda"
    bw = hbm_bandwidth()
    H, D, dtype = 32, 128, torch.float16
    lens = [4096, 16384, 32768] if quick else [4096, 16384, 32768, 131072]
    budgets = [512, 2048] if quick else [512, 1024, 2048, 4096]
    rows = []
    for Hkv in (32, 8):
        for S in lens:
            kv_bytes = 2 * S * Hkv * D * 2
            nbuf = n_copies(S, Hkv, D, min(b for b in budgets if b < S))
            R = max(nbuf, 8)
            torch.manual_seed(S + Hkv)
            bufs = []
            for i in range(nbuf):
                k = torch.randn(1, Hkv, S, D, device=dev, dtype=dtype)
                v = torch.randn(1, Hkv, S, D, device=dev, dtype=dtype)
                sl = torch.full((1,), S, dtype=torch.int32, device=dev)
                kmin, kmax = quest.page_metadata(k, sl, page_size=P)
                q = torch.randn(1, H, D, device=dev, dtype=dtype)
                bufs.append((q, k, v, kmin, kmax, sl))
            out = torch.empty(1, H, D, device=dev, dtype=dtype)

            def dense_fn(i):
                q, k, v = bufs[i % nbuf][:3]
                return lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=(Hkv != H))

            t_dense = time_graph([dense_fn(i) for i in range(R)])
            for budget in budgets:
                if budget >= S:
                    continue
                n_sel = budget // P

                def quest_fn(i):
                    q, k, v, kmin, kmax, sl = bufs[i % nbuf]
                    return lambda: quest.attention(q, k, v, kmin, kmax, sl, page_size=P, token_budget=budget, mode="group")

                def torch_fn(i):
                    q, k, v, kmin, kmax, sl = bufs[i % nbuf]
                    return lambda: torch_quest(q, k, v, kmin, kmax, S, budget)

                # correctness spot check against the plain-PyTorch Quest
                ref = torch_quest(*bufs[0][:5], S, budget)
                got = quest.attention(*bufs[0], page_size=P, token_budget=budget, mode="group")
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                t_q = time_graph([quest_fn(i) for i in range(R)])
                t_q_eager = time_eager([quest_fn(i) for i in range(R)])
                try:
                    t_t = time_graph([torch_fn(i) for i in range(R)])
                except Exception:  # capture can fail on some torch versions
                    t_t = time_eager([torch_fn(i) for i in range(R)])
                meta_bytes = 2 * Hkv * (S // P) * D * 2
                sel_bytes = 2 * Hkv * n_sel * P * D * 2
                nbytes = meta_bytes + sel_bytes
                t_roof = nbytes / bw * 1e3
                rows.append(dict(Hkv=Hkv, S=S, budget=budget, dense=t_dense, quest=t_q, eager=t_q_eager,
                                 torch=t_t, mb=nbytes / 2**20, roof=t_roof, err=err,
                                 byte_ratio=kv_bytes / nbytes))
                r = rows[-1]
                print(f"Hkv={Hkv:2d} S={S:6d} budget={budget:4d}: dense {t_dense:.4f} ms, quest {t_q:.4f} ms "
                      f"({t_dense / t_q:.2f}x, roofline {t_roof:.4f} ms), eager {t_q_eager:.4f}, "
                      f"torch-quest {t_t:.4f} ms, rel.err vs torch-quest {err:.1e}", flush=True)
            del bufs
            torch.cuda.empty_cache()
    return bw, rows


def gpu_markdown(bw, rows):
    lines = gpu_header(bw) + ["",
             "B=1, H=32, D=128, fp16, page 16, mode \"group\". Times in ms (CUDA-graph replay, median).",
             "`speedup` = dense / quest; `bytes` = metadata + selected K/V (MiB); `roof` = bytes / copy bandwidth;",
             "`%roof` = roof / quest time; `eager` = one Python call per step, CPU dispatch included.",
             "",
             "| H_kv | S | budget | dense SDPA | quest (fused) | speedup | byte ratio | bytes MiB | roof | %roof | eager | plain-PyTorch Quest | quest vs torch-Quest |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['Hkv']} | {r['S']} | {r['budget']} | {r['dense']:.4f} | {r['quest']:.4f} | "
                     f"{r['dense'] / r['quest']:.2f}x | {r['byte_ratio']:.1f}x | {r['mb']:.1f} | {r['roof']:.4f} | "
                     f"{100 * r['roof'] / r['quest']:.0f}% | {r['eager']:.4f} | {r['torch']:.4f} | "
                     f"{r['torch'] / r['quest']:.1f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------- CPU ----
def cpu_table(quick=False):
    H, D, dtype = 8, 128, torch.float32
    rows = []
    lens = [2048, 8192] if not quick else [2048]
    for Hkv in (8, 2):
        for S in lens:
            torch.manual_seed(S)
            k = torch.randn(1, Hkv, S, D, dtype=dtype)
            v = torch.randn(1, Hkv, S, D, dtype=dtype)
            q = torch.randn(1, H, D, dtype=dtype)
            sl = torch.full((1,), S, dtype=torch.int32)
            kmin, kmax = quest.page_metadata(k, sl, page_size=P)

            t_dense = time_cpu(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=(Hkv != H)))
            for budget in (256, 1024):
                t_q = time_cpu(lambda: quest.attention(q, k, v, kmin, kmax, sl, page_size=P, token_budget=budget))
                rows.append((Hkv, S, budget, t_dense, t_q))
                print(f"CPU Hkv={Hkv} S={S} budget={budget}: dense {t_dense:.3f} ms quest {t_q:.3f} ms", flush=True)
    lines = [cpu_header(),
             "",
             "B=1, H=8, D=128, fp32, page 16. Wall-clock medians in ms.",
             "",
             "| H_kv | S | budget | dense SDPA (CPU) | quest (fused) | speedup |",
             "|---:|---:|---:|---:|---:|---:|"]
    for Hkv, S, budget, td, tq in rows:
        lines.append(f"| {Hkv} | {S} | {budget} | {td:.3f} | {tq:.3f} | {td / tq:.2f}x |")
    return "\n".join(lines)


def _gpu_sections(quick):
    bw, rows = gpu_table(quick)
    return [gpu_markdown(bw, rows), ""]


def main():
    run_benchmark("quest", "Quest", _gpu_sections, cpu_table)


if __name__ == "__main__":
    main()
