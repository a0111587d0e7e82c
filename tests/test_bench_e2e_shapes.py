"""benchmarks/bench_e2e.py's shapes (configs only, CPU): the numbers of each
model config and the KV bytes the byte floor counts, by hand."""
import os
import sys

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_e2e  # noqa: E402

from kvsparse.geometry import sliding_layers  # noqa: E402

GEMMA3_SLIDING = tuple(i for i in range(48) if i % 6 != 5)


def test_qwen3_8b_config():
    cfg = bench_e2e.model_config("qwen3-8b")
    assert type(cfg).__name__ == "Qwen3Config" and bench_e2e.SHAPES["qwen3-8b"][1] == "Qwen3ForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (36, 4096, 12288, 32, 8, 128, 151936)
    assert cfg.tie_word_embeddings is False and not cfg.use_sliding_window and sliding_layers(cfg) == ()
    assert cfg.max_position_embeddings >= 131072 + 1024
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    assert theta == 1e6


def test_gemma3_12b_config():
    cfg = bench_e2e.model_config("gemma3-12b")
    assert type(cfg).__name__ == "Gemma3TextConfig" and bench_e2e.SHAPES["gemma3-12b"][1] == "Gemma3ForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (48, 3840, 15360, 16, 8, 256, 262208)
    assert cfg.sliding_window == 1024 and cfg.query_pre_attn_scalar == 256
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 8
    assert sliding_layers(cfg) == GEMMA3_SLIDING
    assert cfg.max_position_embeddings >= 131072 + 1024
    rope = getattr(cfg, "rope_parameters", None)
    if rope and "full_attention" in rope:  # transformers 5.x: per layer type
        assert rope["full_attention"]["rope_theta"] == 1e6 and rope["sliding_attention"]["rope_theta"] == 1e4
    else:  # 4.57
        assert cfg.rope_theta == 1e6 and cfg.rope_local_base_freq == 1e4


def test_fewer_layers_keep_the_pattern():
    cfg = bench_e2e.model_config("gemma3-12b", layers=12)
    assert cfg.num_hidden_layers == 12 and sliding_layers(cfg) == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    with pytest.raises(ValueError, match="multiple of 6"):
        bench_e2e.model_config("gemma3-12b", layers=4)
    assert bench_e2e.model_config("qwen3-8b", layers=3).num_hidden_layers == 3


@pytest.mark.parametrize("S", [512, 32768, 131072])
def test_dense_step_bytes_by_hand(S):
    row = 2 * 8 * 128 * 2  # qwen3-8b: K + V, 8 KV heads of 128, bf16
    assert bench_e2e.step_read_bytes(None, {}, bench_e2e.model_config("qwen3-8b"), 1, S) == 36 * S * row
    row = 2 * 8 * 256 * 2  # gemma3-12b: 8 full layers read S tokens, 40 sliding ones the window
    cfg = bench_e2e.model_config("gemma3-12b")
    assert bench_e2e.step_read_bytes(None, {}, cfg, 2, S) == 2 * (8 * S + 40 * min(S, 1024)) * row
    # the llama shapes as before: head_dim 128, every layer full
    assert bench_e2e.step_read_bytes(None, {}, bench_e2e.model_config("llama2-7b"), 1, S) == 32 * S * 2 * 32 * 128 * 2


def test_method_step_bytes_gemma3():
    cfg = bench_e2e.model_config("gemma3-12b")
    S, row = 131072, 2 * 8 * 256 * 2
    local = 40 * 1024 * row
    quest = bench_e2e.METHODS["quest"]  # dense_layers 2 (Quest's default): layers 0, 1 are sliding, none full
    assert bench_e2e.layer_split(quest, cfg) == (list(GEMMA3_SLIDING), [], list(range(5, 48, 6)))
    meta = 2 * 8 * 256 * 2 * (S // 16)
    assert bench_e2e.step_read_bytes(quest, {}, cfg, 1, S) == local + 8 * (meta + 2048 * row)
    deeper = ("quest", dict(quest[1], dense_layers=12))  # full layers 5 and 11 are < 12
    assert bench_e2e.layer_split(deeper, cfg)[1] == [5, 11]
    assert bench_e2e.step_read_bytes(deeper, {}, cfg, 1, S) == local + 2 * S * row + 6 * (meta + 2048 * row)
    sparq = bench_e2e.METHODS["sparq"]
    assert bench_e2e.step_read_bytes(sparq, {}, cfg, 1, S) == local + int(8 * S * row / 8)
