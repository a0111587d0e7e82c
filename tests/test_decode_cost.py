"""A patched decode step does no work and allocates no memory that grows with
the cache length beyond what the method reads (CPU, tiny random Llama).

The check is a profile, not a timer: the bytes allocated by one decode step
(``torch.profiler`` with ``profile_memory``) and the largest tensor any op of
the step touches, at two cache capacities 16x apart and a fixed budget. A
whole-buffer copy (e.g. a functionalized in-place append under
``torch.compile``), a mask over the whole cache, or a K/V expansion shows up
as bytes proportional to the capacity. Quest's page scores legitimately grow
with ``capacity / page_size``, far below one layer's K/V.
"""
import re

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvsparse  # noqa: E402

H_KV, D, LAYERS = 2, 32, 2
METHODS = {  # test id -> (method, patch kwargs)
    "quest": ("quest", dict(token_budget=64, page_size=16, dense_layers=0, dense_below=0)),  # softmax GQA mode
    "quest-group": ("quest", dict(token_budget=64, page_size=16, dense_layers=0, dense_below=0, mode="group")),
    "sparq": ("sparq", dict(r=8, k=64, dense_layers=0)),
    "qaq": ("qaq", dict(dense_layers=0, requant_every=2)),
    # Quest over QAQ: uniform widths (page selection + packed sparse attention only) and
    # QAQ's widths (the static layer re-evaluates every position's width each step, as QAQ's)
    "quest_qaq-4bit": ("quest_qaq", dict(token_budget=64, page_size=16, dense_layers=0, uniform_bits=4)),
    "quest_qaq": ("quest_qaq", dict(token_budget=64, page_size=16, dense_layers=0, requant_every=2)),
}
G = 2  # query heads per KV head


def _model():
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=H_KV, head_dim=D,
                      max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    return model


def _step_profile(method, capacity, compiled):
    """``(bytes allocated by one decode step, largest buffer numel that the
    compiled step's generated code allocates)``."""
    from torch._inductor.utils import run_and_get_code
    from torch.profiler import ProfilerActivity, profile

    model = _model()
    kvsparse.patch(model, method=METHODS[method][0], **METHODS[method][1])
    cache = kvsparse.make_cache(model, 1, capacity)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    fwd = torch.compile(model.forward, dynamic=False) if compiled else model.forward
    tok = torch.tensor([[5]])
    largest = 0
    with torch.no_grad():
        model(ids, **kvsparse.cache_kwargs(model, cache), use_cache=True)
        for i in range(3):  # warm-up (and compile)
            pos = torch.tensor([[40 + i]])
            kw = dict(input_ids=tok, **kvsparse.cache_kwargs(model, cache), position_ids=pos, cache_position=pos[0], use_cache=True)
            if compiled and i == 0:
                _, codes = run_and_get_code(fwd, **kw)
                for dims in re.findall(r"empty_strided_cpu\(\(([0-9, ]*)\)", "\n".join(codes)):
                    numel = 1
                    for x in dims.replace(" ", "").split(","):
                        numel *= int(x) if x else 1
                    largest = max(largest, numel)
            else:
                fwd(**kw)
        pos = torch.tensor([[43]])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            fwd(input_ids=tok, **kvsparse.cache_kwargs(model, cache), position_ids=pos, cache_position=pos[0], use_cache=True)
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events())
    return allocated, largest


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_decode_step_allocates_no_cache_sized_memory(method, compiled):
    small, large = 1024, 16384
    a, _ = _step_profile(method, small, compiled)
    b, largest = _step_profile(method, large, compiled)
    # what the method itself needs per position: Quest a score per page (the
    # fused "group" kernel), or per query head, its softmax and the combined
    # score (quest.combine_scores: ~16 bytes per page per query head); SparQ an
    # approximate score (and its index) per token; 16 bytes each per KV head
    # and layer, plus slack. Quest reads 2 * D * 4 = 256 bytes of page min/max
    # per page per KV head here; one layer's fp32 keys are 8x that for SparQ.
    # QAQ reads every position (here 2 x 81 bytes per position and layer at 8
    # bits: codes, offset, width, scale/zero, outliers) and its static layer
    # re-evaluates every position's width each step (ranges, the window's
    # max, the bounds: temporaries of a few bytes each per position, far below
    # what it reads at a real head dim: 2 x ~1 KB per position at D = 128 x 8 KV heads)
    name, kw = METHODS[method]
    per = 16 if kw.get("mode") == "group" or name == "sparq" else 16 * (G + 1)
    if name == "qaq" or (name == "quest_qaq" and "uniform_bits" not in kw):
        per = 81
    paged = name == "quest" or (name == "quest_qaq" and "uniform_bits" in kw)
    per_pos = per * H_KV * LAYERS / (kw["page_size"] if paged else 1)
    allowed = int((large - small) * per_pos) + 16384
    assert b - a <= allowed, (
        f"{method} ({'compiled' if compiled else 'eager'}): a decode step allocates {a} bytes at capacity "
        f"{small} and {b} at {large}; growth {b - a} > {allowed} (a copy or mask over the whole cache?)"
    )
    # the compiled step allocates no buffer of a layer's K/V size (a
    # functionalized in-place append becomes such a copy)
    assert largest < large * H_KV * D, f"the compiled step allocates a {largest}-element buffer"
