"""Paired bootstrap over eval windows (eval/stats.py) and gates that require a bound at a confidence."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.eval import stats
from compressor.eval.gates import evaluate
from compressor.recipe import GateSpec

N, TOK = 32, 100


def _windows(seed: int = 0):
    """Windows that differ a lot in difficulty (per-token NLL 3 +- 0.5) while the result adds a steady 0.01 nats
    per token (+- 0.002): the case a paired bootstrap is for."""
    rng = np.random.default_rng(seed)
    base = TOK * (3 + 0.5 * rng.normal(size=N))
    res = base + TOK * (0.01 + 0.002 * rng.normal(size=N))
    kl = TOK * rng.gamma(2.0, 0.01, size=N)
    top1 = rng.integers(90, 101, size=N)
    return base, res, kl, top1


def test_point_values_and_paired_interval_is_much_narrower():
    base, res, kl, top1 = _windows()
    iv = stats.quality_intervals(base, res, kl, top1, TOK, level=0.95, resamples=2000, seed=0)
    # Point values are the ratio estimators the metrics use.
    assert iv["perplexity_baseline"]["value"] == pytest.approx(np.exp(base.sum() / (N * TOK)))
    assert iv["perplexity"]["value"] == pytest.approx(np.exp(res.sum() / (N * TOK)))
    assert iv["kl_divergence"]["value"] == pytest.approx(kl.sum() / (N * TOK))
    assert iv["top1_agreement"]["value"] == pytest.approx(top1.sum() / (N * TOK))
    d = iv["perplexity_delta_pct"]
    assert d["value"] == pytest.approx((np.exp((res.sum() - base.sum()) / (N * TOK)) - 1) * 100)
    for k in stats.QUALITY_STATS:
        assert iv[k]["low"] < iv[k]["value"] < iv[k]["high"], k
    # The true increase (0.01 nats/token = +1.005%) is inside, zero is far outside.
    assert d["low"] < 1.005 < d["high"] and d["low"] > 0.9
    # Paired: the change is known to +-0.07%; each perplexity alone only to about +-14%.
    ppl = iv["perplexity"]
    alone_pct = (ppl["high"] - ppl["low"]) / ppl["value"] * 100
    assert d["high"] - d["low"] < 0.2 and alone_pct > 25 and alone_pct / (d["high"] - d["low"]) > 100
    assert iv["windows"] == N and iv["resamples"] == 2000 and iv["level"] == 0.95


def test_seeded_and_level():
    base, res, kl, top1 = _windows()
    a = stats.quality_intervals(base, res, kl, top1, TOK, seed=7)
    assert a == stats.quality_intervals(base, res, kl, top1, TOK, seed=7)
    b = stats.quality_intervals(base, res, kl, top1, TOK, seed=8)
    assert a["perplexity"]["low"] != b["perplexity"]["low"]
    wide = stats.quality_intervals(base, res, kl, top1, TOK, level=0.99, seed=7)
    assert wide["kl_divergence"]["low"] < a["kl_divergence"]["low"] < a["kl_divergence"]["high"] \
        < wide["kl_divergence"]["high"]


def test_coverage_of_90_percent_intervals():
    """Over 300 simulated evaluations of 40 windows with a known mean KL (0.02), the 90% interval holds the
    truth 82-96% of the time (percentile bootstrap under-covers a little on skewed data)."""
    rng = np.random.default_rng(1)
    hits = 0
    for r in range(300):
        kl = TOK * rng.gamma(2.0, 0.01, size=40)
        iv = stats.quality_intervals(np.zeros(40), np.zeros(40), kl=kl, tokens=TOK, level=0.9, resamples=500, seed=r)
        hits += iv["kl_divergence"]["low"] <= 0.02 <= iv["kl_divergence"]["high"]
    assert 0.82 <= hits / 300 <= 0.96


def test_unpaired_input_is_refused():
    with pytest.raises(ValueError, match="not paired"):
        stats.quality_draws([1.0, 2.0], [1.0])


def _metrics(base, res, kl, top1):
    pb, pr = float(np.exp(base.sum() / (N * TOK))), float(np.exp(res.sum() / (N * TOK)))
    b = {"perplexity": pb, "eval_sets": {"s": {"perplexity": pb, "tokens": N * TOK, "window_nll": list(base)}}}
    r = {"perplexity": pr, "kl_divergence": kl.sum() / (N * TOK), "top1_agreement": top1.sum() / (N * TOK),
         "bootstrap": {"resamples": 2000, "seed": 0},
         "eval_sets": {"s": {"perplexity": pr, "tokens": N * TOK, "window_nll": list(res), "window_kl": list(kl),
                             "window_top1": [int(t) for t in top1]}}}
    r["eval_sets"]["s"].update({k: r[k] for k in ("kl_divergence", "top1_agreement")})
    return b, r


def test_confidence_gates_judge_the_bound():
    base, res, kl, top1 = _windows()
    b, r = _metrics(base, res, kl, top1)
    draws = stats.quality_draws(base, res, kl, top1, TOK, 2000, 0)
    up95 = stats.bound(draws["perplexity_delta_pct"], 0.95, upper=True)
    gates = [GateSpec(metric="perplexity", max_increase_pct=1.1),                  # point 1.06%: passes
             GateSpec(metric="perplexity", max_increase_pct=1.1, confidence=0.95),  # upper bound ~1.12%: fails
             GateSpec(metric="perplexity", max_increase_pct=1.2, confidence=0.95),
             GateSpec(metric="top1_agreement", min=0.94, eval_set="s", confidence=0.9),
             GateSpec(metric="kl_divergence", max=0.02, confidence=0.95),
             GateSpec(metric="perplexity", max_decrease=0.0, confidence=0.9)]
    out = evaluate(gates, b, r)
    assert [g["passed"] for g in out] == [True, False, True, True, False, True]
    assert out[1]["bound"] == pytest.approx(up95) and 1.07 < up95 < 1.13
    assert out[1]["measured"] == pytest.approx(out[0]["measured"]) and out[1]["bound_side"] == "upper"
    assert out[1]["reason"] == (f"perplexity max_increase_pct 1.1 at 95% confidence: upper bound {up95:.4g} "
                                f"(measured {out[1]['measured']:.4g}), over by {up95 - 1.1:.4g}")
    # A min gate is judged on the lower bound, below the point value.
    assert out[3]["bound_side"] == "lower" and 0.94 < out[3]["bound"] < out[3]["measured"]
    # KL point 0.0185 is within 0.02; its upper 95% bound (0.0217) is not.
    assert out[4]["measured"] < 0.02 < out[4]["bound"]
    # max_decrease of perplexity: the bound of (baseline - result), negative here: the result is worse.
    assert out[5]["bound"] < 0


def test_confidence_gate_without_window_data_fails_with_reason():
    out = evaluate([GateSpec(metric="perplexity", max=100, confidence=0.95)],
                   {"perplexity": 10.0}, {"perplexity": 10.5})
    assert not out[0]["passed"] and "no per-window data" in out[0]["reason"]
