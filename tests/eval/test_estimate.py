"""`compress estimate`: MODELED cost of a bare config (meta device, no weights), crossover batch, prefill, MoE."""

from __future__ import annotations

import json

import pytest

from compressor.errors import InputError
from compressor.eval import cost_model
from compressor.targets import get_target
from tests.conftest import run_cli

LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
PARAMS_8B = 8_030_261_248  # Llama-3.1-8B's published parameter count
LINEAR_8B = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # q, o, k, v, gate, up, down
ROWS_8B = 32 * (4096 + 1024 + 1024 + 4096 + 3 * 14336 - 14336 + 4096)  # output rows of those layers
H200 = get_target("h200")


@pytest.fixture(scope="module")
def llama_cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama") / "config.json"
    p.write_text(json.dumps(LLAMA_31_8B))
    return p


def test_llama_8b_shapes_bytes_and_figures(llama_cfg):
    cfg = cost_model.load_config(str(llama_cfg))  # a bare config.json
    fp8 = cost_model.estimate(cfg, H200, "fp8", [1, 256])
    assert fp8["parameters"] == PARAMS_8B and fp8["quantized_parameters"] == LINEAR_8B
    # FP8 linear weights + fp32 per-channel scales; embeddings, lm_head and norms in BF16.
    assert fp8["weight_bytes"] == LINEAR_8B + 4 * ROWS_8B + 2 * (PARAMS_8B - LINEAR_8B)
    assert fp8["active_parameters"] == PARAMS_8B - 128256 * 4096  # the input embedding is a lookup
    assert fp8["kv_bytes_per_token"] == 32 * 2 * 8 * 128 * 2
    one, big = fp8["points"]
    # Batch 1 is memory-bound: weights + KV at the mean context (1024 + 512) over 60% of 4.8 TB/s.
    read = fp8["weight_bytes"] + 1536 * fp8["kv_bytes_per_token"]
    assert one["latency_ms_decode"] == pytest.approx(read / (4.8e12 * 0.6) * 1e3)
    assert one["bound"] == "memory" and one["fits"] and big["fits"]
    assert big["memory_gb"] == pytest.approx((fp8["weight_bytes"] + 256 * 2048 * fp8["kv_bytes_per_token"]) / 1e9)
    assert big["usd_per_mtok"] == pytest.approx(4.1 / (big["serving_tokens_per_s"] * 3600) * 1e6)
    # Against TARGETS.md: TensorRT-LLM serves ~17,700 output tok/s (FP8, 1k in / 1k out); the model, at batch 256
    # with a BF16 KV cache, lands within a factor 2 of it.
    assert 0.5 < big["serving_tokens_per_s"] / 17_700 < 1.2
    bf16 = cost_model.estimate(cfg, H200, "bf16", [1, 256])
    assert bf16["weight_bytes"] == 2 * PARAMS_8B and bf16["quantized_parameters"] == 0
    speedup_1 = one["tokens_per_s"] / bf16["points"][0]["tokens_per_s"]
    assert 1.6 < speedup_1 < 1.8  # bytes only: 16.06 GB vs 9.09 GB (+ the same KV)
    # Prefill of 1024 tokens at batch 1: compute-bound at 60% of the FP8 peak.
    flops = 2 * fp8["active_parameters"] * 1024 + 2 * 32 * 1024 ** 2 * 4096
    assert one["latency_ms_prefill"] == pytest.approx(flops / (1979e12 * 0.6) * 1e3)


def test_crossover_batch_matches_targets_and_the_decode_bound():
    params = 8_000_000_000
    # TARGETS.md: B* = peak x bytes-per-weight / (2 x bandwidth): ~206 for BF16, ~52 for INT4 weight-only.
    assert cost_model.crossover_batch(H200, 2 * params, params, 0, "bf16", 0) == pytest.approx(989 / 4.8)
    assert cost_model.crossover_batch(H200, params // 2, params, 0, "bf16", 0) == pytest.approx(989 / 4.8 / 4)
    # With a KV cache, the crossover moves out; decode() agrees on either side of it.
    kv, ctx = 32 * 2 * 8 * 128 * 2, 64
    b_star = cost_model.crossover_batch(H200, 2 * params, params, kv, "bf16", ctx)
    assert 206 < b_star < 300
    below = cost_model.decode(H200, 2 * params, params, kv, "bf16", int(b_star * 0.99), ctx)
    above = cost_model.decode(H200, 2 * params, params, kv, "bf16", int(b_star * 1.01) + 1, ctx)
    assert below["bound"] == "memory" and above["bound"] == "compute"
    # At long contexts the KV read grows as fast as compute: never compute-bound.
    assert cost_model.crossover_batch(H200, 2 * params, params, kv, "bf16", 4096) is None


def test_moe_reads_the_experts_a_batch_hits(tmp_path):
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    e = cost_model.estimate(cost_model.load_config(str(tmp_path)), H200, "w4a16", [1, 4, 64])
    experts = 2 * 8 * 3 * 64 * 128  # layers x experts x (gate, up, down)
    assert e["moe"] == {"experts": 8, "top_k": 2, "expert_params": experts}
    dense = e["parameters"] - experts - 256 * 64
    assert e["active_parameters"] == dense + experts // 4
    reads = [p["experts_read"] for p in e["points"]]
    assert reads[0] == pytest.approx(2.0) and reads[1] == pytest.approx(8 * (1 - 0.75 ** 4)) and reads[2] > 7.99
    # The router stays in BF16 (never quantized); expert weights are INT4 with a BF16 scale per 128.
    assert e["quantized_parameters"] == experts + 2 * (2 * 64 * 64 + 2 * 64 * 32)


def test_refusals(llama_cfg, tmp_path):
    cfg = cost_model.load_config(str(llama_cfg))
    with pytest.raises(InputError, match="NVFP4 needs compute capability 10.0"):
        cost_model.estimate(cfg, H200, "nvfp4", [1])
    with pytest.raises(InputError, match="no FP8 units before compute capability 8.9"):
        cost_model.estimate(cfg, get_target("a100"), "fp8", [1])
    with pytest.raises(InputError, match="'int3' is not one of bf16, fp8"):
        cost_model.estimate(cfg, H200, "int3", [1])
    with pytest.raises(InputError, match="measured, not modeled"):
        cost_model.estimate(cfg, get_target("cpu"), "bf16", [1])
    with pytest.raises(InputError, match="holds no config.json"):
        cost_model.load_config(str(tmp_path))
    bad = tmp_path / "wrong-type"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**LLAMA_31_8B, "num_hidden_layers": "thirty-two"}))
    with pytest.raises(InputError, match="not a readable transformers config"):  # was an uncaught typed-config error
        cost_model.load_config(str(bad))
    b200 = cost_model.estimate(cfg, get_target("b200"), "nvfp4", [1])
    # FP4 values + an FP8 scale per 16: 4.5 bits a weight (the per-tensor scale is negligible).
    assert b200["precision"] == "fp4"
    assert b200["weight_bytes"] == LINEAR_8B * 4.5 / 8 + 2 * (PARAMS_8B - LINEAR_8B)


def test_cli_prints_modeled_table_and_refuses_bad_price(llama_cfg, capsys):
    rc, out, err = run_cli(["estimate", "--model", llama_cfg, "--target", "h200", "--scheme", "int4", "--batch", "1",
                            "--batch", "52"], capsys)
    assert rc == 0, err
    assert out.startswith("MODELED") and "scheme w4a16" in out and "parameters 8.030 B" in out
    assert "crossover batch (decode turns compute-bound)" in out and "$/Mtok (MODELED)" in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith(("1 |", "52 |"))]) == 2
    rc, out, err = run_cli(["estimate", "--model", llama_cfg, "--target", "h200", "--scheme", "bf16",
                            "--usd-per-hour", "2", "--json"], capsys)
    e = json.loads(out)
    assert rc == 0 and e["price"] == {"usd_per_hour": 2.0, "source": "recipe/command line"}
    assert [p["batch"] for p in e["points"]] == [1, 8, 64, 256]
    for bad in ("-1", "0", "nan"):
        rc, _, err = run_cli(["estimate", "--model", llama_cfg, "--target", "h200", "--scheme", "bf16",
                              "--usd-per-hour", bad], capsys)
        assert rc == 2 and "--usd-per-hour must be a positive number" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["estimate", "--model", llama_cfg, "--target", "a100", "--scheme", "fp8"], capsys)
    assert rc == 2 and "fp8 is not supported on target a100" in err
