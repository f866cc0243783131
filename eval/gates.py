"""Gates: compare a measured metric to a limit (absolute, or relative to the baseline) and say by how much."""

from __future__ import annotations

KNOWN_METRICS = ("perplexity", "kl_divergence", "top1_agreement", "model_bytes", "peak_rss_mb", "peak_rss_mb_compress",
                 "compress_seconds", "latency_ms_prefill", "latency_ms_decode", "tokens_per_s")


def _lookup(metrics: dict, name: str, eval_set: str | None):
    if eval_set is not None:
        metrics = metrics.get("eval_sets", {}).get(eval_set, {})
    v = metrics.get(name)
    if isinstance(v, dict):  # measured figures carry their spread: gate on the median
        v = v.get("median")
    return v


def evaluate(gates, baseline: dict, result: dict) -> list[dict]:
    out = []
    for g in gates:
        value = _lookup(result, g.metric, g.eval_set)
        base = _lookup(baseline, g.metric, g.eval_set)
        kind, limit = g.kind, g.limit
        entry = {"metric": g.metric, "eval_set": g.eval_set, "kind": kind, "limit": limit, "value": value,
                 "baseline": base}
        if value is None or (kind.startswith("max_increase") or kind.startswith("max_decrease")) and base is None:
            entry.update(passed=False, reason=f"{g.metric} was not measured in this run")
            out.append(entry)
            continue
        if kind == "max":
            measured, ok = value, value <= limit
        elif kind == "min":
            measured, ok = value, value >= limit
        elif kind == "max_increase":
            measured = value - base
            ok = measured <= limit
        elif kind == "max_decrease":
            measured = base - value
            ok = measured <= limit
        elif kind == "max_increase_pct":
            measured = (value - base) / abs(base) * 100 if base else float("inf")
            ok = measured <= limit
        else:  # max_decrease_pct
            measured = (base - value) / abs(base) * 100 if base else float("inf")
            ok = measured <= limit
        entry.update(measured=measured, passed=bool(ok))
        if not ok:
            entry["reason"] = f"{g.metric} {kind} {limit}: measured {measured:.4g}, over by {abs(measured - limit):.4g}"
        out.append(entry)
    return out
