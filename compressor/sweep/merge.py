"""One report from a sweep's variants: every variant with its metrics (or why it was skipped or failed), the
Pareto frontier of quality (perplexity on the primary eval set) against cost (the same axis as pareto.png:
MODELED $/Mtok on a GPU target, else measured decode latency, else bytes), and the cheapest variant that passes
every gate, which is also the report's `result` (so `compress report` and `compress compare` work on it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from compressor.eval import plot


def _load(vdir: Path, name: str) -> dict | None:
    f = vdir / name / "report" / "report.json"
    return json.loads(f.read_text()) if f.is_file() else None


def sweep_report(plan, vdir: Path, results: dict, *, executor: str, parallel: int, seconds: float) -> dict:
    reports = {v.name: _load(vdir, v.name) for v in plan.runnable if results.get(v.name, {}).get("status") in
               ("ok", "gates_failed")}
    reports = {k: r for k, r in reports.items() if r is not None}
    first = next(iter(reports.values()), None)
    _, cost_of = plot.cost_axis(first) if first else (None, lambda m: None)
    variants = []
    for v in plan.variants:
        res = results.get(v.name, {})
        rep = reports.get(v.name)
        e = {"name": v.name, "status": v.status if v.status == "skipped" else res.get("status", "not run"),
             "reason": v.reason or res.get("error"), "overrides": v.overrides, "passes": v.passes,
             "seconds": res.get("seconds"), "seconds_saved": round(sum(res.get("saved", {}).values()), 3),
             "saved_by_kind": res.get("saved", {}), "resumed": bool(res.get("resumed")),
             "attempts": res.get("attempts", 0)}
        if rep is not None:
            m = rep["result"]["metrics"]
            e.update(metrics=m, gates=rep["gates"], passed=all(g["passed"] for g in rep["gates"]),
                     cost=cost_of(m), artifacts=[f"variants/{v.name}/{a['path']}" for a in rep["artifacts"]])
        variants.append(e)
    _mark(variants, first)
    done = [v for v in variants if "metrics" in v]
    passing = [v for v in done if v["passed"] and v["cost"] is not None]
    cheapest = min(passing, key=lambda v: (v["cost"], v["metrics"].get("perplexity", float("inf"))), default=None)
    if cheapest is not None:
        cheapest["cheapest_passing"] = True
    chosen = cheapest or min(done, key=lambda v: v["metrics"].get("perplexity", float("inf")), default=None)
    ran = [v for v in variants if v["status"] in ("ok", "gates_failed", "error") and not v["resumed"]]
    saved: dict[str, float] = {}
    for v in ran:
        for k, s in v["saved_by_kind"].items():
            saved[k] = round(saved.get(k, 0.0) + s, 3)
    sweep = {"variants_total": len(variants), "ran": len(ran), "resumed": sum(v["resumed"] for v in variants),
             "skipped": [{"name": v["name"], "reason": v["reason"]} for v in variants if v["status"] == "skipped"],
             "failed": [{"name": v["name"], "reason": v["reason"]} for v in variants if v["status"] == "error"],
             "seconds": round(seconds, 3), "variant_seconds": round(sum(v["seconds"] or 0 for v in ran), 3),
             "seconds_saved": round(sum(saved.values()), 3), "saved_by_kind": saved,
             "resumed_seconds": round(sum(v["seconds"] or 0 for v in variants if v["resumed"]), 3),
             "frontier": [v["name"] for v in variants if v.get("frontier")],
             "cheapest_passing": cheapest["name"] if cheapest else None,
             "result": chosen["name"] if chosen else None,
             "result_is": "the cheapest variant that passes every gate" if cheapest else
                          "no variant passes the gates: the one with the lowest perplexity" if chosen else "none",
             "cost_axis": plot.cost_axis(first)[0] if first else None,
             "executor": executor, "parallel": parallel}
    base = reports[chosen["name"]] if chosen else None
    return {
        "schema_version": 1,
        "model": base["model"] if base else {"source": "", "parameters": 0},
        "target": plan.target,
        "recipe": {"name": plan.recipe_name, "path": plan.recipe_path},
        "passes": base["passes"] if base else [],
        "baseline": base["baseline"] if base else {"metrics": {}},
        "result": base["result"] if base else {"metrics": {}},
        "variants": variants,
        "gates": base["gates"] if base else [],
        "artifacts": [a | {"path": f"variants/{chosen['name']}/{a['path']}"} for a in base["artifacts"]] if base else [],
        "notes": (base.get("notes", []) if base else []),
        "sweep": sweep,
    }


def _mark(variants: list[dict], first: dict | None) -> None:
    """variant["frontier"]: no other point (the baseline included) is at most as costly and at most as perplexed."""
    for v in variants:
        v["frontier"] = False
        v["cheapest_passing"] = False
    if first is None:
        return
    pts = [{"name": v["name"], "cost": float(v["cost"]), "quality": float(v["metrics"]["perplexity"])}
           for v in variants if v.get("cost") is not None and "perplexity" in v.get("metrics", {})]
    b = first["baseline"]["metrics"]
    _, cost_of = plot.cost_axis(first)
    if cost_of(b) is not None and "perplexity" in b:
        pts.append({"name": None, "cost": float(cost_of(b)), "quality": float(b["perplexity"])})
    front = {p["name"] for p in plot.pareto_front(pts)}
    for v in variants:
        v["frontier"] = v["name"] in front


def write_report(report: dict, folder: Path) -> None:
    """report.json/.md/.html + pareto.png into `folder`, replaced as a whole (a reader never sees a mix)."""
    from compressor.eval import report as report_mod

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        report_mod.write(report, tmp)
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
            os.replace(folder, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
