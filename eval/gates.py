"""Gates: compare a measured metric to a limit (absolute, or relative to the baseline) and say by how much.

A gate with `confidence` judges a bound instead of the point value: the one-sided bootstrap bound over eval
windows (eval/stats.py) in the direction that would fail the gate. "perplexity max_increase_pct 2 at 0.95" passes
only if the 95th percentile of the paired bootstrap of the increase is at most 2%.
"""

from __future__ import annotations

KNOWN_METRICS = ("perplexity", "kl_divergence", "top1_agreement", "model_bytes", "peak_rss_mb", "peak_rss_mb_compress",
                 "compress_seconds", "latency_ms_prefill", "latency_ms_decode", "tokens_per_s",
                 # the primary task (first of eval.tasks, else of eval.lm_eval.tasks): multiple-choice accuracy
                 "accuracy", "accuracy_norm",
                 # encoders: cosine of sentence embeddings to the original's (primary eval set), mean and worst
                 "embedding_cosine", "embedding_cosine_min")

# kind -> (bootstrap statistic of a perplexity gate, sign turning it into the gated quantity)
_PPL_STAT = {"max": ("perplexity", 1), "min": ("perplexity", 1), "max_increase": ("perplexity_delta", 1),
             "max_decrease": ("perplexity_delta", -1), "max_increase_pct": ("perplexity_delta_pct", 1),
             "max_decrease_pct": ("perplexity_delta_pct", -1)}


def _lookup(metrics: dict, name: str, eval_set: str | None):
    if eval_set is not None:
        metrics = metrics.get("eval_sets", {}).get(eval_set, {})
    v = metrics.get(name)
    if isinstance(v, dict):  # measured figures carry their spread: gate on the median
        v = v.get("median")
    return v


def _measured(kind: str, value: float, base: float | None) -> float:
    """The gated quantity: the value itself, or its change against the baseline."""
    if kind in ("max", "min"):
        return value
    if kind == "max_increase":
        return value - base
    if kind == "max_decrease":
        return base - value
    if kind == "max_increase_pct":
        return (value - base) / abs(base) * 100 if base else float("inf")
    return (base - value) / abs(base) * 100 if base else float("inf")  # max_decrease_pct


def _bound(g, baseline: dict, result: dict) -> tuple[float | None, str | None, dict | None]:
    """(bound of the gated quantity at the gate's confidence, why not, bootstrap settings used)."""
    from compressor.eval import stats

    if g.metric in ("accuracy", "accuracy_norm"):
        return _task_bound(g, baseline, result)
    sets = result.get("eval_sets", {})
    name = g.eval_set or next(iter(sets), None)
    win = stats.window_inputs(baseline.get("eval_sets", {}).get(name, {}), sets.get(name, {})) if name else None
    if win is None:
        return None, f"{g.metric} has no per-window data in this run: no bootstrap bound", None
    boot = result.get("bootstrap", {})
    resamples, seed = boot.get("resamples", 2000), boot.get("seed", 0)
    if g.metric == "perplexity":
        stat, sign = _PPL_STAT[g.kind]
    else:
        stat, sign = g.metric, 1
    draws = stats.quality_draws(win["base_nll"], win["res_nll"], win["kl"], win["top1"], win["tokens"],
                                resamples, seed)
    if stat not in draws:
        return None, f"{g.metric} has no per-window data in this run: no bootstrap bound", None
    # A max-kind gate fails high: its bound is the upper one; a min gate fails low.
    upper = g.kind != "min"
    b = stats.bound(sign * draws[stat], g.confidence, upper=upper)
    return b, None, {"eval_set": name, "resamples": resamples, "seed": seed}


def _task_bound(g, baseline: dict, result: dict) -> tuple[float | None, str | None, dict | None]:
    """The bound of an accuracy gate: a paired bootstrap over the primary task's items (eval/mc.py)."""
    import numpy as np

    from compressor.eval import stats
    from compressor.eval.mc import mean_draws

    task = result.get("primary_task")
    key = "correct" if g.metric == "accuracy" else "correct_norm"
    res = (result.get("tasks") or {}).get(task, {}).get(key)
    base = (baseline.get("tasks") or {}).get(task, {}).get(key)
    if not res or not base or len(res) != len(base):
        return None, f"{g.metric} has no per-item data in this run: no bootstrap bound", None
    boot = result.get("bootstrap", {})
    resamples, seed = boot.get("resamples", 2000), boot.get("seed", 0)
    d = mean_draws(np.asarray([res, base], dtype=np.float64).T, resamples, seed)  # (resamples, [result, base])
    r, b = d[:, 0], d[:, 1]
    gated = {"max": r, "min": r, "max_increase": r - b, "max_decrease": b - r,
             "max_increase_pct": (r - b) / np.abs(b) * 100, "max_decrease_pct": (b - r) / np.abs(b) * 100}[g.kind]
    return stats.bound(gated, g.confidence, upper=g.kind != "min"), None, {"task": task, "resamples": resamples,
                                                                          "seed": seed}


def evaluate(gates, baseline: dict, result: dict) -> list[dict]:
    out = []
    for g in gates:
        value = _lookup(result, g.metric, g.eval_set)
        base = _lookup(baseline, g.metric, g.eval_set)
        kind, limit = g.kind, g.limit
        confidence = getattr(g, "confidence", None)
        entry = {"metric": g.metric, "eval_set": g.eval_set, "kind": kind, "limit": limit, "value": value,
                 "baseline": base}
        if confidence is not None:
            entry["confidence"] = confidence
        if value is None or (kind.startswith("max_increase") or kind.startswith("max_decrease")) and base is None:
            entry.update(passed=False, reason=f"{g.metric} was not measured in this run")
            out.append(entry)
            continue
        measured = _measured(kind, value, base)
        judged = measured
        if confidence is not None:
            judged, why, used = _bound(g, baseline, result)
            if judged is None:
                entry.update(measured=measured, passed=False, reason=why)
                out.append(entry)
                continue
            entry.update(bound=judged, bound_side="lower" if kind == "min" else "upper", bootstrap=used)
        ok = judged >= limit if kind == "min" else judged <= limit
        entry.update(measured=measured, passed=bool(ok))
        if not ok:
            if confidence is None:
                entry["reason"] = (f"{g.metric} {kind} {limit}: measured {measured:.4g}, "
                                   f"over by {abs(measured - limit):.4g}")
            else:
                side = entry["bound_side"]
                entry["reason"] = (f"{g.metric} {kind} {limit} at {confidence:.0%} confidence: {side} bound "
                                   f"{judged:.4g} (measured {measured:.4g}), over by {abs(judged - limit):.4g}")
        out.append(entry)
    return out
