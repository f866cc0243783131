"""`compress compare OUT_A OUT_B`: two runs' reports side by side: quality with intervals, the difference B - A
(paired over windows when both runs evaluated the same windows of the same baseline), cost, and the gates whose
verdict changed.

Two runs are paired when their baselines' per-window NLL agree: same model, same held-out windows. Then the
bootstrap draws the same window indices for A and B (same seed, same count: eval/stats.resample_counts), and the
interval of B - A is the paired one, far narrower than the two separate intervals suggest.
"""

from __future__ import annotations

import math

from compressor.eval import stats
from compressor.eval.report import Table, md_table

_QUALITY = (("perplexity", "perplexity", 4), ("perplexity_delta_pct", "perplexity change vs baseline %", 3),
            ("kl_divergence", "KL divergence", 4), ("top1_agreement", "top-1 agreement", 4))


def _same_windows(a: dict, b: dict) -> bool:
    wa, wb = a.get("window_nll"), b.get("window_nll")
    return bool(wa) and bool(wb) and len(wa) == len(wb) and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(wa, wb))


def _cell(iv: dict | None, value, digits: int) -> str:
    if iv:
        return f"{iv['value']:.{digits}g} [{iv['low']:.{digits}g}, {iv['high']:.{digits}g}]"
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else "-"


def _boot(report: dict) -> dict:
    return report["result"]["metrics"].get("bootstrap") or {}


def quality(a: dict, b: dict) -> list[dict]:
    """Per common eval set and metric: A, B (with their intervals) and B - A (paired interval when possible)."""
    out = []
    ra, rb = a["result"]["metrics"].get("eval_sets", {}), b["result"]["metrics"].get("eval_sets", {})
    ba, bb = a["baseline"]["metrics"].get("eval_sets", {}), b["baseline"]["metrics"].get("eval_sets", {})
    boot = _boot(b) or _boot(a)
    level, resamples, seed = boot.get("level", 0.95), boot.get("resamples", 2000), boot.get("seed", 0)
    for name in [n for n in ra if n in rb]:
        paired = _same_windows(ba[name], bb[name])
        wa, wb = stats.window_inputs(ba[name], ra[name]), stats.window_inputs(bb[name], rb[name])
        da = db = None
        if paired and wa and wb:  # same (n, resamples, seed): the same window indices in both
            da = stats.quality_draws(**wa, resamples=resamples, seed=seed)
            db = stats.quality_draws(**wb, resamples=resamples, seed=seed)
        for key, label, digits in _QUALITY:
            iva, ivb = ra[name].get("intervals", {}).get(key), rb[name].get("intervals", {}).get(key)
            va = iva["value"] if iva else ra[name].get(key)
            vb = ivb["value"] if ivb else rb[name].get(key)
            row = {"eval_set": name, "metric": key, "label": label, "digits": digits, "a": va, "b": vb,
                   "a_interval": iva, "b_interval": ivb, "paired": paired, "difference": None}
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                row["difference"] = {"value": vb - va}
                if da is not None and key in da and key in db:
                    lo, hi = stats.interval(db[key] - da[key], level)
                    row["difference"].update(low=lo, high=hi, level=level)
            out.append(row)
    return out


def gates(a: dict, b: dict) -> list[dict]:
    """Every gate of either run with both verdicts; `changed` when they differ or only one run has the gate."""
    def key(g):
        return (g["metric"], g.get("eval_set"), g["kind"], g["limit"], g.get("confidence"))

    ga, gb = {key(g): g for g in a["gates"]}, {key(g): g for g in b["gates"]}
    out = []
    for k in list(ga) + [k for k in gb if k not in ga]:
        x, y = ga.get(k), gb.get(k)
        out.append({"metric": k[0], "eval_set": k[1], "kind": k[2], "limit": k[3], "confidence": k[4],
                    "a": None if x is None else x["passed"], "b": None if y is None else y["passed"],
                    "a_measured": x and x.get("measured"), "b_measured": y and y.get("measured"),
                    "changed": x is None or y is None or x["passed"] != y["passed"]})
    return out


def cost(a: dict, b: dict) -> list[dict]:
    rows = []
    ma, mb = a["result"]["metrics"], b["result"]["metrics"]
    for k in ("model_bytes", "parameters", "nonzero_parameters", "latency_ms_prefill", "latency_ms_decode",
              "tokens_per_s", "compress_seconds"):
        va, vb = ma.get(k), mb.get(k)
        va, vb = (v.get("median") if isinstance(v, dict) else v for v in (va, vb))
        if va is not None or vb is not None:
            rows.append({"metric": k, "a": va, "b": vb, "measured": True})
    pa, pb = (m.get("modeled") or {} for m in (ma, mb))
    if pa.get("target") and pa.get("target") == pb.get("target"):
        for x, y in zip(pa["points"], pb["points"]):
            rows.append({"metric": f"MODELED $/Mtok on {pa['target']}, batch {x['batch']}", "a": x["usd_per_mtok"],
                         "b": y["usd_per_mtok"], "measured": False})
    return rows


def compare(a: dict, b: dict, path_a: str = "A", path_b: str = "B") -> dict:
    same_model = a["model"].get("sha256") == b["model"].get("sha256")
    return {"a": {"path": path_a, "recipe": a["recipe"]["name"], "target": a["target"]},
            "b": {"path": path_b, "recipe": b["recipe"]["name"], "target": b["target"]},
            "same_baseline_model": same_model, "quality": quality(a, b), "cost": cost(a, b), "gates": gates(a, b)}


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else "-"


def render(c: dict) -> str:
    a, b = c["a"], c["b"]
    lines = [f"# compare: A = {a['recipe']} ({a['path']}, {a['target']})  vs  B = {b['recipe']} ({b['path']}, "
             f"{b['target']})", ""]
    if not c["same_baseline_model"]:
        lines.append("Note: the runs start from different baseline models; differences mix both changes.\n")
    q: Table = (["eval set", "metric", "A", "B", "B - A"], [])
    for r in c["quality"]:
        d = r["difference"]
        diff = "-" if d is None else f"{d['value']:+.{r['digits']}g}" + (
            f" [{d['low']:+.{r['digits']}g}, {d['high']:+.{r['digits']}g}] paired" if "low" in d else
            " (windows differ: no paired interval)" if not r["paired"] else "")
        q[1].append([r["eval_set"], r["label"], _cell(r["a_interval"], r["a"], r["digits"]),
                     _cell(r["b_interval"], r["b"], r["digits"]), diff])
    if q[1]:
        lines += ["## Quality (brackets: bootstrap intervals over eval windows)", ""] + md_table(q) + [""]
    co: Table = (["metric", "A", "B", "B / A"], [])
    for r in c["cost"]:
        ratio = f"{r['b'] / r['a']:.3f}x" if isinstance(r["a"], (int, float)) and isinstance(r["b"], (int, float)) \
            and r["a"] else "-"
        co[1].append([r["metric"], _num(r["a"]), _num(r["b"]), ratio])
    lines += ["## Cost", ""] + md_table(co) + [""]
    verdict = {True: "pass", False: "FAIL", None: "(absent)"}
    g: Table = (["gate", "A", "B", "changed"], [])
    for r in c["gates"]:
        name = f"{r['metric']}" + (f" ({r['eval_set']})" if r["eval_set"] else "") + f" {r['kind']} {r['limit']}" + (
            f" at {r['confidence']:.0%}" if r["confidence"] else "")
        g[1].append([name, f"{verdict[r['a']]} ({_num(r['a_measured'])})", f"{verdict[r['b']]} ({_num(r['b_measured'])})",
                     "**changed**" if r["changed"] else ""])
    if g[1]:
        changed = sum(r["changed"] for r in c["gates"])
        lines += [f"## Gates ({changed} changed)", ""] + md_table(g)
    return "\n".join(lines) + "\n"
