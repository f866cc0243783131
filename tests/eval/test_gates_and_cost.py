from __future__ import annotations

import pytest

from compressor.eval import cost_model
from compressor.eval.gates import evaluate
from compressor.recipe import GateSpec
from compressor.targets import get_target


def test_gate_kinds():
    base = {"perplexity": 10.0, "top1_agreement": 1.0, "tokens_per_s": {"median": 100.0, "min": 90, "max": 110, "n": 5}}
    res = {"perplexity": 10.5, "top1_agreement": 0.97, "tokens_per_s": {"median": 120.0, "min": 100, "max": 130, "n": 5}}
    gates = [GateSpec(metric="perplexity", max_increase_pct=4.0), GateSpec(metric="perplexity", max_increase_pct=6.0),
             GateSpec(metric="top1_agreement", min=0.98), GateSpec(metric="perplexity", max=11),
             GateSpec(metric="tokens_per_s", max_decrease_pct=0.0), GateSpec(metric="kl_divergence", max=0.1)]
    out = evaluate(gates, base, res)
    assert [g["passed"] for g in out] == [False, True, False, True, True, False]
    assert out[0]["measured"] == pytest.approx(5.0) and "over by 1" in out[0]["reason"]
    assert out[5]["reason"] == "kl_divergence was not measured in this run"


def test_roofline_crossover_and_cost():
    h200 = get_target("h200")
    params = 8_000_000_000
    bf16 = params * 2
    # Weights only (no KV): decode turns compute-bound near B* = peak * bytes/weight / (2 * bandwidth) ~ 206.
    below = cost_model.decode(h200, bf16, params, 0, "bf16", 200, 1)
    above = cost_model.decode(h200, bf16, params, 0, "bf16", 212, 1)
    assert below["bound"] == "memory" and above["bound"] == "compute"
    one = cost_model.decode(h200, bf16, params, 0, "bf16", 1, 1)
    assert one["latency_ms_decode"] == pytest.approx(bf16 / (4.8e12 * 0.6) * 1e3)
    assert one["usd_per_mtok"] == pytest.approx(4.1 / (one["tokens_per_s"] * 3600) * 1e6)
    # INT4 weights move a quarter of the bytes: ~4x the batch-1 tokens/s.
    int4 = cost_model.decode(h200, bf16 // 4, params, 0, "bf16", 1, 1)
    assert int4["tokens_per_s"] / one["tokens_per_s"] == pytest.approx(4.0)
    assert not cost_model.decode(h200, 150e9, params, 0, "bf16", 1, 1)["fits"]


def test_2of4_layers_are_modeled_compressed_and_parameters_counted():
    """A 2:4 layer is served as half its values plus a 2-bit index per kept value (and half the FLOPs);
    the harness counts the zeros of pruned weights as parameters that are not 'nonzero'."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.eval.harness import parameter_counts

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    dense_bytes, dense_params, _ = cost_model.serving_weight_bytes(model)
    up = model.model.layers[0].mlp.up_proj.weight  # 128 x 64
    with torch.no_grad():
        up.view(-1, 4)[:, :2] = 0  # 2:4 along the input dimension
    model.config.compressor_sparsity = {"model.layers.0.mlp.up_proj": "2:4"}
    sparse_bytes, sparse_params, _ = cost_model.serving_weight_bytes(model)
    n = 128 * 64
    assert dense_bytes - sparse_bytes == 2 * n - (n + n // 8)
    assert dense_params - sparse_params == n // 2
    total, nonzero = parameter_counts(model)
    assert total == dense_params and total - nonzero == n // 2
    cost = cost_model.model_cost(get_target("h200"), model, [1], 512)
    assert cost["sparse_2of4_layers"] == 1
