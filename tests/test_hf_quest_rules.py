"""Quest's selection rules (GQA modes, sink / recent pages, the adaptive budget):
the ops against plain-PyTorch references, and a patched model against an
independent reference attention built on transformers' own ``repeat_kv``
(the query-to-KV-head mapping, the post-RoPE query and keys)."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvsparse  # noqa: E402
from kvsparse import hf, quest  # noqa: E402
from kvsparse.methods import quest as quest_method  # noqa: E402

from kvs_testing import DEVICES, seed as _seed  # noqa: E402

P = 8


# ------------------------------------------------------------------ the ops
def _forced_ref(n_pages, length, sink, recent):
    used = -(-length // P)
    return {p for p in range(used) if p < sink or p >= used - recent}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sink,recent", [(0, 1), (1, 1), (2, 3), (0, 4)])
def test_force_pages_are_selected_first(device, sink, recent):
    torch.manual_seed(_seed("force", sink, recent))
    lens = [203, 61, 9]
    n_pages = -(-max(lens) // P)
    s = torch.randn(3, 2, n_pages) * 3
    sl = torch.tensor(lens, dtype=torch.int32)
    for b, n in enumerate(lens):
        s[b, :, -(-n // P):] = float("-inf")
    got = quest.force_pages(s.to(device), sl.to(device), P, sink, recent).cpu()
    budget = 6 * P
    idx = quest.select_pages(got.to(device), sl.to(device), P, budget).cpu()
    for b, n in enumerate(lens):
        forced = _forced_ref(n_pages, n, sink, recent)
        for p in range(n_pages):
            if p in forced:
                assert math.isinf(got[b, 0, p]) and got[b, 0, p] > 0
            else:
                assert torch.equal(got[b, :, p], s[b, :, p])
        for r in range(2):
            kept = {p for p in idx[b, r].tolist() if p >= 0}
            assert forced <= kept and len(kept) == min(6, -(-n // P))


def _top_p_ref(idx, mass, length, p, sink, recent):
    forced = _forced_ref(mass.shape[-1], length, sink, recent)
    entries = [e for e in idx if e >= 0]
    order = sorted(entries, key=lambda e: (e not in forced, -float(mass[e])))
    kept, acc = set(), 0.0
    for i, e in enumerate(order):
        if e in forced or i == 0 or acc < p:
            kept.add(e)
        acc += float(mass[e])
    return [e if e in kept else -1 for e in idx]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("sink,recent", [(0, 1), (1, 2)])
def test_top_p_pages_matches_reference(device, p, sink, recent):
    torch.manual_seed(_seed("topp", p, sink, recent))
    B, Hkv, G = 2, 2, 3
    lens = [170, 45]
    n_pages = -(-max(lens) // P)
    head = torch.randn(B, Hkv * G, n_pages) * 4
    for b, n in enumerate(lens):
        head[b, :, -(-n // P):] = float("-inf")
    sl = torch.tensor(lens, dtype=torch.int32)
    mass = quest.group_mass(head.to(device), Hkv, 0.5)
    md = torch.softmax(0.5 * head.double(), -1).view(B, Hkv, G, n_pages).mean(2)
    torch.testing.assert_close(mass.cpu().double(), md, atol=1e-6, rtol=1e-5)
    scores = quest.force_pages(quest.combine_scores(head, Hkv, "softmax", 0.5), sl, P, sink, recent)
    idx = quest.select_pages(scores.to(device), sl.to(device), P, 10 * P)
    got = quest.top_p_pages(idx, mass, sl.to(device), P, p, sink, recent).cpu()
    assert got.shape == idx.shape and got.dtype == torch.int32
    for b, n in enumerate(lens):
        for r in range(Hkv):
            want = _top_p_ref(idx[b, r].cpu().tolist(), mass[b, r].cpu(), n, p, sink, recent)
            assert got[b, r].tolist() == want
    if p == 1.0:  # the mass of the selected pages is below 1: every selected page stays
        assert torch.equal(got, idx.cpu())


def test_rule_config_is_validated():
    with pytest.raises(ValueError, match="sink_pages"):
        kvsparse.QuestConfig(sink_pages=-1).validate()
    # a budget of fewer pages than sink + recent: the last page, then the sinks, then the recent window
    c = kvsparse.QuestConfig(token_budget=32, page_size=16, sink_pages=2, recent_pages=4)
    c.validate()
    assert quest_method.forced_counts(c, 2) == (1, 1)
    assert quest_method.forced_counts(c, 4) == (2, 2)
    assert quest_method.forced_counts(c, 16) == (2, 4)
    assert quest_method.forced_counts(kvsparse.QuestConfig(sink_pages=0), 1) == (0, 1)
    with pytest.raises(ValueError, match="recent_pages"):
        kvsparse.QuestConfig(recent_pages=0).validate()
    with pytest.raises(ValueError, match="top_p"):
        kvsparse.QuestConfig(top_p=1.5).validate()
    with pytest.raises(ValueError, match="top_p"):
        kvsparse.QuestConfig(top_p=True).validate()
    with pytest.raises(ValueError, match="top_p"):
        quest.top_p_pages(torch.zeros(1, 1, 2, dtype=torch.int32), torch.ones(1, 1, 2),
                          torch.tensor([16], dtype=torch.int32), 8, 0.0)
    kvsparse.QuestConfig(token_budget=64, page_size=16, sink_pages=1, recent_pages=3, top_p=0.9).validate()
    assert quest_method.fused_rule(kvsparse.QuestConfig(mode="group", sink_pages=0, recent_pages=1))
    assert not quest_method.fused_rule(kvsparse.QuestConfig(mode="group"))  # the default keeps a sink page
    c = kvsparse.QuestConfig()
    assert (c.mode, c.sink_pages, c.recent_pages, c.top_p) == ("softmax", 1, 1, None)


# --------------------------------------------- a patched model against a reference
def _model(G=2, Hkv=2, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=Hkv * G, num_key_value_heads=Hkv, head_dim=16,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float().eval().requires_grad_(False)


def _reference_attention(budget, mode, sink, recent, top_p):
    """Decode attention over the pages the rule selects, computed from the
    module's own post-RoPE query and key states, with K/V expanded to the
    query heads by transformers' ``repeat_kv`` (float64)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama import modeling_llama

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        if query.shape[2] != 1:  # prefill: dense, as every kvsparse method
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kw)
        B, H, _, D = query.shape
        Hkv = key.shape[1]
        G = H // Hkv
        S = key.shape[2]
        repeat_kv = modeling_llama.repeat_kv  # looked up per call (a test swaps it)
        k = repeat_kv(key, G).double()  # [B, H, S, D]: query head h reads what transformers gives it
        v = repeat_kv(value, G).double()
        q = query[:, :, 0].double()
        n_pages = -(-S // P)
        pad = n_pages * P - S
        kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
        fill = torch.zeros(B, H, n_pages * P, 1, dtype=torch.bool)
        fill[:, :, S:] = True
        lo = kp.masked_fill(fill, float("inf")).view(B, H, n_pages, P, D).amin(3)
        hi = kp.masked_fill(fill, float("-inf")).view(B, H, n_pages, P, D).amax(3)
        bound = torch.maximum(q[:, :, None] * lo, q[:, :, None] * hi).sum(-1)  # [B, H, n_pages]
        prob = torch.softmax(scaling * bound, -1)
        n_sel = min(budget // P, n_pages)
        out = torch.empty(B, H, D, dtype=torch.float64)
        for b in range(B):
            for hk in range(Hkv):
                heads = range(hk * G, (hk + 1) * G)
                rows = [[h] for h in heads] if mode == "head" else [list(heads)]
                for hs in rows:
                    if mode == "head":
                        score = bound[b, hs[0]]
                    elif mode == "group":  # the summed bounds
                        score = bound[b, hs].sum(0)
                    else:  # "softmax": the summed per-head distributions
                        score = prob[b, hs].sum(0)
                    # a budget smaller than sink + recent: the last page, the sinks, then the window
                    sk = min(sink, n_sel - 1)
                    rc = max(1, min(recent, n_sel - sk))
                    forced = _forced_ref(n_pages, S, sk, rc) | {n_pages - 1}
                    if n_pages <= n_sel:
                        sel = list(range(n_pages))
                    else:
                        rest = sorted((p for p in range(n_pages) if p not in forced),
                                      key=lambda p: (-float(score[p]), p))
                        sel = sorted(forced) + rest[: n_sel - len(forced)]
                    if top_p is not None:
                        mass = prob[b, hs].mean(0)
                        idx = sorted(sel)
                        sel = [e for e in _top_p_ref(idx, mass, S, top_p, sk, rc) if e >= 0]
                    keep = torch.zeros(S, dtype=torch.bool)
                    for p in sel:
                        keep[p * P:(p + 1) * P] = True
                    for h in hs:
                        logit = (k[b, h] @ q[b, h]) * scaling
                        w = torch.softmax(logit.masked_fill(~keep, float("-inf")), -1)
                        out[b, h] = w @ v[b, h]
        return out.to(query.dtype)[:, None], None

    return fn


def _stepwise(model, ids, cont, cache):
    out = model(ids, **kvsparse.cache_kwargs(model, cache), use_cache=True)
    logits = [out.logits[:, -1]]
    cache = out.past_key_values
    for i in range(cont.shape[1]):
        pos = torch.full((ids.shape[0], 1), ids.shape[1] + i, dtype=torch.long)
        out = model(cont[:, i:i + 1], **kvsparse.cache_kwargs(model, cache), position_ids=pos, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("mode,sink,recent,top_p", [
    ("head", 0, 1, None), ("softmax", 0, 1, None), ("softmax", 1, 2, None), ("head", 1, 1, None),
    ("softmax", 1, 2, 0.6), ("head", 1, 2, 0.6), ("group", 1, 4, None),
])
def test_patched_selection_matches_repeat_kv_reference(mode, sink, recent, top_p):
    """A small budget over 12 pages: the patched model's logits equal the
    reference attention's, which selects from transformers' own post-RoPE
    states and its ``repeat_kv`` head mapping. A query head reading another
    KV head's bounds, a pre-RoPE query or pre-RoPE bounds would select other
    pages and change the logits."""
    from transformers import AttentionInterface

    budget = 4 * P
    model = _model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 93), generator=g)
    cont = torch.randint(3, 128, (2, 5), generator=g)
    name = f"kvs_ref_{mode}_{sink}_{recent}_{top_p}".replace(".", "_")
    AttentionInterface.register(name, _reference_attention(budget, mode, sink, recent, top_p))
    hf._set_attn_implementation(model, name)
    try:
        want = _stepwise(model, ids, cont, DynamicCache(config=model.config))
    finally:
        hf._set_attn_implementation(model, "sdpa")
    dense = _stepwise(model, ids, cont, DynamicCache(config=model.config))
    with hf.patched(model, token_budget=budget, page_size=P, dense_layers=0, dense_below=0, mode=mode,
                    sink_pages=sink, recent_pages=recent, top_p=top_p):
        got = _stepwise(model, ids, cont, kvsparse.make_cache(model))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - dense).abs().max() > 1e-3  # the budget really prunes


def test_a_wrong_head_mapping_would_be_caught():
    """The reference above tells the mappings apart: with query heads mapped
    to KV heads round-robin (``h % Hkv``) instead of ``h // G``, the
    selected pages, and so the logits, differ."""
    from transformers import AttentionInterface
    from transformers.models.llama import modeling_llama

    budget = 4 * P
    model = _model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (1, 93), generator=g)
    cont = torch.randint(3, 128, (1, 3), generator=g)
    AttentionInterface.register("kvs_ref_head", _reference_attention(budget, "head", 0, 1, None))
    orig = modeling_llama.repeat_kv

    def round_robin(x, n_rep):  # h -> h % Hkv
        return x.repeat(1, n_rep, 1, 1)

    hf._set_attn_implementation(model, "kvs_ref_head")
    try:
        right = _stepwise(model, ids, cont, DynamicCache(config=model.config))
        modeling_llama.repeat_kv = round_robin
        wrong = _stepwise(model, ids, cont, DynamicCache(config=model.config))
    finally:
        modeling_llama.repeat_kv = orig
        hf._set_attn_implementation(model, "sdpa")
    with hf.patched(model, token_budget=budget, page_size=P, dense_layers=0, dense_below=0, mode="head",
                    sink_pages=0, recent_pages=1):
        got = _stepwise(model, ids, cont, kvsparse.make_cache(model))
    torch.testing.assert_close(got, right, atol=2e-5, rtol=1e-4)
    assert (got - wrong).abs().max() > 1e-3
