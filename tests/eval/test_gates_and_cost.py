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
