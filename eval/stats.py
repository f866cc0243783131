"""Paired bootstrap over evaluation windows: confidence intervals for perplexity, its change against the
baseline, KL divergence and top-1 agreement.

The unit of resampling is the window (consecutive tokens are not independent; windows nearly are). Each
bootstrap draw picks N window indices with replacement, seeded, and the SAME indices for baseline and result,
so the change in perplexity is judged on matched text (a paired bootstrap): the shared difficulty of a window
cancels and the interval of the change is much narrower than the two perplexities' intervals suggest.

A draw's statistic is the ratio estimator the point value uses, e.g. perplexity = exp(sum nll / sum tokens) over
the drawn windows. Intervals are percentile intervals (two-sided, `level`); a gate asks for a one-sided bound
(`bound`): "the increase is below X with 95% confidence" is the 95th percentile of the draws.
"""

from __future__ import annotations

import numpy as np

METHOD = "paired percentile bootstrap over eval windows"
# Statistics with per-window data; the names of report.json (result.metrics.eval_sets.<set>.intervals).
QUALITY_STATS = ("perplexity_baseline", "perplexity", "perplexity_delta", "perplexity_delta_pct", "kl_divergence",
                 "top1_agreement")
_CHUNK = 1024  # resamples per block: bounds the (resamples x windows) count matrix


def resample_counts(n_windows: int, resamples: int, seed: int):
    """Blocks of (k, n_windows) multiplicities: how often each window appears in each draw. Seeded (PCG64),
    so a report's intervals reproduce exactly from its windows and seed."""
    if n_windows < 1:
        raise ValueError("bootstrap needs at least one window")
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        k = min(_CHUNK, resamples - done)
        idx = rng.integers(0, n_windows, size=(k, n_windows))
        counts = np.zeros((k, n_windows), dtype=np.float64)
        np.add.at(counts, (np.arange(k)[:, None], idx), 1.0)
        yield counts
        done += k


def quality_draws(base_nll, res_nll, kl=None, top1=None, tokens=None, resamples: int = 2000,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap distributions (resamples,) of every quality statistic, from per-window sums.

    base_nll, res_nll: summed negative log-likelihood per window; kl: summed KL (nats) per window; top1: count of
    positions where result and baseline agree; tokens: scored positions per window (default: all equal, so only
    the ratios matter and 1 per window is used)."""
    cols = {"base": np.asarray(base_nll, dtype=np.float64), "res": np.asarray(res_nll, dtype=np.float64)}
    n = len(cols["base"])
    if len(cols["res"]) != n:
        raise ValueError(f"baseline has {n} windows, result {len(cols['res'])}: not paired")
    cols["tok"] = np.ones(n) if tokens is None else np.broadcast_to(np.asarray(tokens, dtype=np.float64), (n,))
    for name, v in (("kl", kl), ("top1", top1)):
        if v is not None:
            cols[name] = np.asarray(v, dtype=np.float64)
    names = list(cols)
    values = np.stack([cols[k] for k in names], axis=1)  # (n, stats)
    sums = np.concatenate([c @ values for c in resample_counts(n, resamples, seed)])  # (resamples, stats)
    s = dict(zip(names, sums.T))
    ppl_b, ppl_r = np.exp(s["base"] / s["tok"]), np.exp(s["res"] / s["tok"])
    out = {"perplexity_baseline": ppl_b, "perplexity": ppl_r, "perplexity_delta": ppl_r - ppl_b,
           "perplexity_delta_pct": (ppl_r / ppl_b - 1.0) * 100.0}
    if "kl" in s:
        out["kl_divergence"] = s["kl"] / s["tok"]
    if "top1" in s:
        out["top1_agreement"] = s["top1"] / s["tok"]
    return out


def point_values(base_nll, res_nll, kl=None, top1=None, tokens=None) -> dict[str, float]:
    """The statistics on the windows as they are (the values the intervals are around)."""
    n = len(base_nll)
    tok = float(np.sum(np.broadcast_to(np.asarray(tokens if tokens is not None else 1.0, dtype=np.float64), (n,))))
    b, r = float(np.exp(np.sum(base_nll) / tok)), float(np.exp(np.sum(res_nll) / tok))
    out = {"perplexity_baseline": b, "perplexity": r, "perplexity_delta": r - b,
           "perplexity_delta_pct": (r / b - 1.0) * 100.0}
    if kl is not None:
        out["kl_divergence"] = float(np.sum(kl)) / tok
    if top1 is not None:
        out["top1_agreement"] = float(np.sum(top1)) / tok
    return out


def interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    """Two-sided percentile interval holding `level` of the draws."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [a, 1.0 - a])
    return float(lo), float(hi)


def bound(draws: np.ndarray, confidence: float, upper: bool) -> float:
    """One-sided bound: the value the statistic stays below (upper) or above (lower) with `confidence`."""
    return float(np.quantile(draws, confidence if upper else 1.0 - confidence))


def quality_intervals(base_nll, res_nll, kl=None, top1=None, tokens=None, level: float = 0.95,
                      resamples: int = 2000, seed: int = 0) -> dict:
    """{"level", "resamples", "seed", "windows", "method", "<stat>": {"value", "low", "high"}} for every
    statistic in QUALITY_STATS that the inputs allow."""
    draws = quality_draws(base_nll, res_nll, kl, top1, tokens, resamples, seed)
    points = point_values(base_nll, res_nll, kl, top1, tokens)
    out: dict = {"level": level, "resamples": resamples, "seed": seed, "windows": len(base_nll), "method": METHOD}
    for k in QUALITY_STATS:
        if k in draws:
            lo, hi = interval(draws[k], level)
            out[k] = {"value": points[k], "low": lo, "high": hi}
    return out


def window_inputs(base_set: dict, res_set: dict) -> dict | None:
    """The per-window arrays of one eval set of report.json (baseline and result metrics), or None when the
    report holds no per-window data. Windows are equally long: tokens per window = tokens / windows."""
    b, r = base_set.get("window_nll"), res_set.get("window_nll")
    if not b or not r or len(b) != len(r):
        return None
    n = len(b)
    return {"base_nll": b, "res_nll": r, "kl": res_set.get("window_kl"), "top1": res_set.get("window_top1"),
            "tokens": res_set.get("tokens", n) / n}
