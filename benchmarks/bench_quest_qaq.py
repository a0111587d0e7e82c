"""Benchmark of one Quest-over-QAQ decode step (page scores + selection +
packed sparse attention) against Quest over a bf16 cache and dense SDPA.

Shape: Llama-3-8B's attention (H = 32, H_kv = 8, D = 128), bf16, one layer,
S in {32k, 128k}, B in {1, 8}, token budget 2048 in pages of 16, the GQA mode
"softmax" (Quest's default): for each point, in the same run,

  * dense      torch.nn.functional.scaled_dot_product_attention (enable_gqa);
  * quest      kvsparse.quest page_scores + combine_scores + select_pages +
               sparse_attention over bf16 K / V (Quest over fp16, the baseline);
  * quest_qaq  the same selection + kvsparse.qaq.sparse_attention over QAQ
               stores at uniform 4 bits (per-head groups, alpha = 0.02: 4
               outlier slots per token and head; and shared groups: E = 1024,
               22 slots), i.e. what the quest_qaq method's decode step runs;
  * select     the selection alone (scores + combine + select), the part both share.

Times: CUDA-event medians of CUDA-graph replays rotating over 4 copies of the
cache (so that the selected pages never sit in L2) and 4 queries. Bytes per
step: the page bounds (2 * pages * H_kv * D * 2) + the selected tokens' K and V
(bf16: 2 * n_sel * P * H_kv * D * 2; packed: the codes at 4 bits + per token
and group 9 metadata bytes + n_out * 4 outlier bytes, read by every KV head's
block); `roof` = bytes / copy bandwidth.

Usage:  python benchmarks/bench_quest_qaq.py [--out benchmarks/results] [--quick]
"""
import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

from kvsparse import qaq, quest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import gpu_header, hbm_bandwidth, time_graph  # noqa: E402

H, HKV, D, P, BUDGET = 32, 8, 128, 16, 2048
DT = torch.bfloat16
COPIES = 4


def selector(kmin, kmax, lens, scale):
    def sel(q):
        s = quest.page_scores(q, kmin, kmax, lens, P, "head")
        s = quest.combine_scores(s, HKV, "softmax", scale)
        return quest.select_pages(s, lens, P, BUDGET)
    return sel


def point(B, S, bw):
    g = torch.Generator(device="cuda").manual_seed(B * 7 + S)
    scale = D ** -0.5
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    qs = [torch.randn(B, H, D, device="cuda", dtype=DT, generator=g) for _ in range(COPIES)]
    rows = []
    n_sel = BUDGET // P
    pages = -(-S // P)
    meta = 2 * pages * HKV * D * 2 * B
    dense_b = 2 * B * HKV * S * D * 2
    # bf16 caches and their page bounds
    caches = []
    for _ in range(COPIES):
        k = torch.randn(B, HKV, S, D, device="cuda", dtype=DT, generator=g)
        v = torch.randn(B, HKV, S, D, device="cuda", dtype=DT, generator=g)
        kmin, kmax = quest.page_metadata(k, lens, P)
        caches.append((k, v, kmin, kmax))
    t_dense = time_graph([
        (lambda c=c, q=q: F.scaled_dot_product_attention(q.view(B, H, 1, D), c[0], c[1], enable_gqa=True))
        for c, q in zip(caches, qs)])
    rows.append(dict(variant="dense SDPA", ms=t_dense, bytes=dense_b))
    sels = [selector(c[2], c[3], lens, scale) for c in caches]
    t_sel = time_graph([(lambda s=s, q=q: s(q)) for s, q in zip(sels, qs)])
    rows.append(dict(variant="select (scores + combine + select)", ms=t_sel, bytes=meta))
    t_quest = time_graph([
        (lambda s=s, c=c, q=q: quest.sparse_attention(q, c[0], c[1], s(q), lens, P, scale))
        for s, c, q in zip(sels, caches, qs)])
    sel_fp = 2 * B * n_sel * P * HKV * D * 2
    rows.append(dict(variant="quest (bf16 cache)", ms=t_quest, bytes=meta + sel_fp, sel_bytes=sel_fp))
    for shared in (False, True):
        stores = []
        for c in caches:
            ks = qaq.alloc(B, HKV, S, D, DT, "cuda", alpha=0.02, shared=shared)
            vs = qaq.alloc(B, HKV, S, D, DT, "cuda", alpha=0.02, shared=shared)
            w = torch.full((B, ks.offsets.shape[1], S), 4, dtype=torch.uint8, device="cuda")
            pos = torch.zeros(B, dtype=torch.int32, device="cuda")
            qaq.quantize(ks, c[0], pos, w)
            qaq.quantize(vs, c[1], pos, w)
            stores.append((ks, vs))
        n_out = stores[0][0].oidx.shape[-1]
        codes = 2 * B * n_sel * P * HKV * D * 4 // 8
        per_tok = 2 * B * n_sel * P * HKV * (9 + n_out * 4)
        t = time_graph([
            (lambda s=s, st=st, q=q: qaq.sparse_attention(q, st[0], st[1], s(q), lens, P, scale))
            for s, st, q in zip(sels, stores, qs)])
        rows.append(dict(variant=f"quest_qaq 4-bit ({'shared groups' if shared else 'per-head groups'}, "
                         f"{n_out} outlier slots)", ms=t, bytes=meta + codes + per_tok, sel_bytes=codes,
                         sel_meta_bytes=per_tok))
        del stores
    del caches
    torch.cuda.empty_cache()
    for r in rows:
        r.update(B=B, S=S, roof_ms=r["bytes"] / bw * 1e3, vs_dense=t_dense / r["ms"], vs_quest=t_quest / r["ms"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="B=1 and B=8 at 128k only")
    args = ap.parse_args()
    bw = hbm_bandwidth()
    pts = [(1, 131072), (8, 131072)] if args.quick else [(1, 32768), (1, 131072), (8, 32768), (8, 131072)]
    rows = []
    for B, S in pts:
        rows += point(B, S, bw)
        for r in rows[-5:]:
            print(json.dumps(r), flush=True)
    dev = torch.cuda.get_device_name().replace(" ", "_").lower()
    lines = [f"# Quest over QAQ: one decode step's attention ({datetime.date.today()})", ""]
    lines += gpu_header(bw)
    lines += ["", "Command: `python benchmarks/bench_quest_qaq.py" + (" --quick" if args.quick else "") + "`", "",
              "| B | S | variant | ms | vs dense | vs quest | bytes read | roof ms | %roof | selected bytes / quest's |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q_sel = next(x for x in rows if x["B"] == r["B"] and x["S"] == r["S"] and x["variant"].startswith("quest ("))
        frac = f"{r['sel_bytes'] / q_sel['sel_bytes']:.3f}" if "sel_bytes" in r else ""
        if "sel_meta_bytes" in r:
            frac += f" (+{r['sel_meta_bytes'] / q_sel['sel_bytes']:.3f} metadata)"
        lines.append(f"| {r['B']} | {r['S']} | {r['variant']} | {r['ms']:.4f} | {r['vs_dense']:.2f}x | "
                     f"{r['vs_quest']:.2f}x | {r['bytes'] / 1e6:.1f} MB | {r['roof_ms']:.4f} | "
                     f"{100 * r['roof_ms'] / r['ms']:.0f}% | {frac} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"quest_qaq_{dev}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
