"""kvsparse.ruler: the RULER-style task generators, the scorer and a tiny end-to-end run."""
import json
import os
import random
import re

import pytest

from kvsparse import ruler
from kvsparse.eval import ByteTokenizer

TOK = ByteTokenizer()


def _text(s):
    return TOK.decode(s.context_ids), TOK.decode(s.question_ids)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_generator_is_seeded(task):
    a = ruler.make_sample(TOK, task, 1500, random.Random("x"))
    b = ruler.make_sample(TOK, task, 1500, random.Random("x"))
    c = ruler.make_sample(TOK, task, 1500, random.Random("y"))
    assert (a.context_ids, a.question_ids, a.answers) == (b.context_ids, b.question_ids, b.answers)
    assert (a.context_ids, a.answers) != (c.context_ids, c.answers)
    assert abs(a.prompt_tokens - 1500) <= 40  # within a filler unit or so


@pytest.mark.parametrize("length", [700, 3000])
@pytest.mark.parametrize("task", ruler.TASKS)
def test_answers_are_where_intended(task, length):
    s = ruler.make_sample(TOK, task, length, random.Random(f"{task}-{length}"))
    ctx, q = _text(s)
    assert s.answers and s.max_new_tokens > 0
    if task.startswith("niah"):
        for v in s.answers:  # each asked value is in the context exactly once, in its needle
            assert ctx.count(v) == 1
            key = re.search(r"The special magic number for (\w+) is " + v, ctx).group(1)
            assert key in q
        n_needles = len(re.findall(r"The special magic number for", ctx))
        assert n_needles == (1 if task == "niah_single" else 4)
        if task == "niah_multivalue":
            assert len(set(re.findall(r"for (\w+) is", ctx))) == 1
    elif task == "vt":
        value = re.search(r"value (\d+)", q).group(1)
        assert ctx.count(value) == 1
        chain = re.findall(r"VAR (\w+) = (?:VAR (\w+)|\d+)\.", ctx)
        assert [c[0] for c in chain] == s.answers  # in order, each pointing to the previous
        assert [c[1] for c in chain[1:]] == s.answers[:-1]
    else:
        words = re.findall(r"\d+\. (\w+)", ctx) if task == "cwe" else ctx.split("\n\n")[1].split()
        counts = {w: words.count(w) for w in set(words)}
        k = len(s.answers)
        assert k == (10 if task == "cwe" else 3)
        rest = [c for w, c in counts.items() if w not in s.answers]
        assert min(counts[a] for a in s.answers) >= max(rest)
        assert min(counts[a] for a in s.answers) > 1


def test_score():
    assert ruler.score("The number is 1234567.", ["1234567"]) == 100.0
    assert ruler.score("1234567 and 7654321", ["1234567", "7654321", "1111111"]) == pytest.approx(200 / 3)
    assert ruler.score("KABO, demi", ["kabo", "demi"]) == 100.0
    assert ruler.score("", ["x"]) == 0.0
    with pytest.raises(ValueError):
        ruler.score("x", [])
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.make_sample(TOK, "qa", 100, random.Random(0))


def test_tiny_end_to_end(tmp_path):
    from kvsparse import eval as ev

    out = tmp_path / "r"
    args = ["--model", "tiny", "--task", "ruler", "--ruler-tasks", "niah_single,vt", "--method", "quest",
            "--budgets", "64", "--lengths", "300", "--samples", "1", "--no-progress"]
    rc = ev.main(args + ["--out", str(out)])
    assert rc == 0
    md = (out / "results.md").read_text()
    assert "RULER-style suite" in md and "Question decoded under the method" in md
    rows = json.loads((out / "ruler.json").read_text())
    assert {r["press"] for r in rows} == {"dense", "quest-64"}
    assert {(r["task"], r["question"]) for r in rows} == {(t, p) for t in ("niah_single", "vt")
                                                          for p in ("prompt", "decoded")}
    for r in rows:
        assert set(r) >= {"dataset", "model", "method", "compression_ratio", "task", "context_length", "score"}
        assert 0 <= r["score"] <= 100 and 0 <= r["compression_ratio"] < 1
    assert os.path.exists(out / "results.json")
    res = json.loads((out / "results.json").read_text())
    summ = res["ruler"]["summary"]
    assert {(x["run"], x["question"], x["length"]) for x in summ} == {
        (r, p, L) for r in ("dense", "quest-64") for p in ("prompt", "decoded") for L in (300, "all")}
    assert all(x["samples"] == 2 and len(x["ci95"]) == 2 and x["ci95"][0] <= x["score"] <= x["ci95"][1]
               for x in summ)  # two samples (one per task) per (run, placement, length)
    assert all(r["score_ci95"] is None for r in rows)  # one sample per row: no interval
    assert "95% Student-t interval" in md and len((out / "records.jsonl").read_text().splitlines()) == 8



def test_shards_merged_equal_one_run(tmp_path):
    """--shard 1/2 and 2/2 (every other sample) merged: the records and scores of one unsharded run."""
    from kvsparse import eval as ev

    args = ["--model", "tiny", "--task", "ruler", "--ruler-tasks", "niah_single", "--method", "quest",
            "--budgets", "64", "--lengths", "200", "--samples", "2", "--question", "prompt", "--no-progress"]
    for name, extra in (("one", []), ("s1", ["--shard", "1/2"]), ("s2", ["--shard", "2/2"])):
        assert ev.main(args + extra + ["--out", str(tmp_path / name)]) == 0
    s1 = json.loads((tmp_path / "s1" / "results.json").read_text())
    assert {r["sample"] for r in s1["ruler"]["records"]} == {0}
    assert ev.main(["--merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    merged = json.loads((tmp_path / "m" / "results.json").read_text())

    def key(r):
        return (r["run"], r["task"], r["length"], r["sample"], r["question"], r["output"], r["score"])

    assert [key(r) for r in merged["ruler"]["records"]] == [key(r) for r in one["ruler"]["records"]]
    assert len(one["ruler"]["records"]) == 4
    assert merged["ruler"]["summary"] == one["ruler"]["summary"]
    assert json.loads((tmp_path / "m" / "ruler.json").read_text()) == json.loads(
        (tmp_path / "one" / "ruler.json").read_text())
    assert len((tmp_path / "m" / "records.jsonl").read_text().splitlines()) == 4
