"""The selection-recall diagnostic (``python -m kvsparse.eval --task recall``) on a tiny random LLaMA."""
import json

import pytest

pytest.importorskip("transformers")

from kvsparse import eval as ev  # noqa: E402
from kvsparse.eval.tasks.recall import run_recall  # noqa: E402


def _runs(budgets, **kw):
    return [ev.MethodRun("quest", {"token_budget": b, "page_size": 16, "dense_layers": 0, **kw}) for b in budgets]


def test_recall_is_bounded_by_the_oracle_and_full_budget_is_exact():
    model, tok = ev.tiny_model(seed=0)
    runs = _runs([32, 64, 4096]) + _runs([64], mode="head") + _runs([64], sink_pages=1, recent_pages=2) \
        + _runs([64], top_p=0.5)
    recs = run_recall(model, tok, runs, [300], [0.5], 1, max_new_tokens=2, progress=False)
    assert {r["run"] for r in recs} == {r.label for r in runs}
    assert {r["layer"] for r in recs} == set(range(model.config.num_hidden_layers))
    for r in recs:
        # the oracle takes the row's most massive pages: no rule of the same size beats it
        assert 0.0 <= r["recall"] <= r["oracle"] + 1e-6 <= 1.0 + 1e-6, r
    full = [r for r in recs if r["token_budget"] == 4096]
    assert all(abs(r["recall"] - 1) < 1e-5 and abs(r["oracle"] - 1) < 1e-5 for r in full)
    small = [r for r in recs if r["token_budget"] == 32]
    assert all(r["pages"] == 2 and r["recall"] < 0.9 for r in small)
    adaptive = [r for r in recs if r["top_p"] == 0.5]
    assert all(r["pages"] <= 4 for r in adaptive)


def test_recall_refuses_other_methods():
    model, tok = ev.tiny_model(seed=0)
    with pytest.raises(ValueError, match="Quest"):
        run_recall(model, tok, [ev.MethodRun("sparq", {"compression": 0.5})], [200], [0.5], 1, progress=False)


def test_cli_recall_writes_its_report(tmp_path):
    rc = ev.main(["--task", "recall", "--model", "tiny", "--budgets", "32,64", "--lengths", "256",
                  "--depths", "0.5", "--trials", "1", "--max-new-tokens", "2", "--out", str(tmp_path),
                  "--no-progress"])
    assert rc == 0
    md = (tmp_path / "recall.md").read_text()
    assert "recall / oracle" in md and "quest-32" in md
    data = json.loads((tmp_path / "recall.json").read_text())
    assert data["records"] and all("ratio" in r for r in data["records"])
