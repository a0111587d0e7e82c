"""benchmarks/bench_capacity.py end to end in its --smoke mode (tiny model, CPU, eager)."""
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_capacity  # noqa: E402


@pytest.mark.parametrize("method, kwargs", [("qaq", {"uniform_bits": 4}),
                                            ("quest", {"token_budget": 64, "page_size": 16})])
def test_smoke_run_writes_a_method_row_and_a_dense_row(tmp_path, method, kwargs):
    bench_capacity.main(["--smoke", "--method", method, "--kwargs", json.dumps(kwargs), "--out", str(tmp_path)])
    rows = [json.loads(line) for line in open(tmp_path / "capacity_cpu.jsonl")]
    assert [r["method"].split()[0] for r in rows] == [method, "dense"]
    for r in rows:
        assert r["error"] is None and r["B"] == 2 and r["S"] == 200
        assert r["decode_ms"] > 0 and r["tok_s"] > 0 and r["kv_gib"] > 0 and r["floor_ms"] > 0
    assert len(rows[0]["prefill_each_s"]) == 2
    table = (tmp_path / "capacity_cpu.md").read_text()
    assert "Device: cpu" in table and rows[0]["date"] in table and table.count("| tiny-llama |") == 2


def test_generate_continues_a_filled_dense_cache_with_one_token():
    """The dense rows' StaticCache holds S - 1 random tokens: generate() over S
    ids runs the last one only, then decodes."""
    model = bench_capacity.build_smoke_model()
    S, new = 50, 3
    ids = torch.randint(3, 256, (2, S))
    cache = bench_capacity.fill_dense_cache(model, 2, S, S + new, torch.device("cpu"), torch.float32)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[-1]))
    try:
        bench_capacity.timed_generate(model, ids, cache, new, skip=0, compile_ok=False)
    finally:
        hook.remove()
    assert seen == [1] * new
    assert int(cache.get_seq_length()) == S - 1 + new


@pytest.mark.parametrize("fill", ["chunked", "synthetic"])
def test_long_single_sequence_fills(tmp_path, fill):
    """--fill chunked / synthetic: one sequence prefilled in chunks straight into its cache; the
    synthetic fill leaves the patch's attention as it found it."""
    from kvsparse import hf, methods

    orig = hf._continuation_attention
    bench_capacity.main(["--smoke", "--batch", "1", "--fill", fill, "--prefill-chunk", "48", "--no-dense",
                         "--method", "quest_qaq", "--kwargs", json.dumps({"token_budget": 64, "uniform_bits": 4}),
                         "--out", str(tmp_path)])
    (row,) = [json.loads(line) for line in open(tmp_path / "capacity_cpu.jsonl")]
    assert row["error"] is None and row["B"] == 1 and len(row["prefill_each_s"]) == -(-199 // 48)
    assert ("synthetic fill" in row["note"]) == (fill == "synthetic")
    assert hf._continuation_attention is orig
    assert all("continuation_kv" not in methods.get(n).__dict__ for n in methods.names())


def test_fill_needs_one_sequence():
    with pytest.raises(SystemExit):
        bench_capacity.main(["--smoke", "--batch", "2", "--fill", "chunked"])
