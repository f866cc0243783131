"""Run the shipped recipes on the bundled SmolLM2 and compare them: a table on stdout, JSON and an SVG plot.

    python -m compressor.eval.bench.recipes --targets cpu h200 --out bench-out [--no-cache]
    python -m compressor.eval.bench.recipes --targets h200 --recipes recipes/a.yaml recipes/b.yaml --out DIR

`--recipes` takes shipped recipe names or paths to recipe files. Recipes compared should share their eval section
(data, windows, length); the table warns when they do not.

Each recipe x target runs in its own `compress` process (so its wall time and peak RSS are its own). Figures
are from one run each on this machine; latency figures inside each run are medians over its repetitions,
with baseline and result interleaved.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from compressor.eval.plot import scatter_svg

RECIPES = ["quickstart", "smollm2-w4a16-rtn", "smollm2-fp8-weight-rtn"]


def run_one(recipe: Path, target: str, out: Path, no_cache: bool) -> dict:
    cmd = [sys.executable, "-m", "compressor", str(recipe), "--target", target, "--out", str(out), "--json",
           "--quiet", "--overwrite"] + (["--no-cache"] if no_cache else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode not in (0, 1):
        raise SystemExit(f"{recipe.name} --target {target} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    rep = json.loads((out / "report" / "report.json").read_text())
    b, r = rep["baseline"]["metrics"], rep["result"]["metrics"]
    row = {"recipe": recipe.stem, "target": target, "wall_s": round(wall, 1),
           "compress_s": round(r["compress_seconds"], 1), "peak_rss_mb": round(r["peak_rss_mb"]),
           "model_mb": r["model_bytes"] / 1e6, "baseline_model_mb": b["model_bytes"] / 1e6,
           "params_m": r.get("parameters", 0) / 1e6, "nonzero_m": r.get("nonzero_parameters", 0) / 1e6,
           "baseline_params_m": b.get("parameters", 0) / 1e6,
           "eval": json.dumps({k: rep["recipe"].get("eval", {}).get(k) for k in ("datasets", "num_windows", "seq_len")},
                              sort_keys=True),
           "gates_passed": all(g["passed"] for g in rep["gates"])}
    for name, rs in r["eval_sets"].items():
        row[f"ppl_base[{name}]"] = b["eval_sets"][name]["perplexity"]
        row[f"ppl[{name}]"] = rs["perplexity"]
        row[f"kl[{name}]"] = rs["kl_divergence"]
        row[f"top1[{name}]"] = rs["top1_agreement"]
    if "latency_ms_decode" in r:
        row["ort_decode_ms"] = r["latency_ms_decode"]["median"]
        row["ort_decode_ms_base"] = b["latency_ms_decode"]["median"]
    if "modeled" in r:
        p = r["modeled"]["points"][0]
        row["modeled_tok_s_b1"] = p["tokens_per_s"]
        row["modeled_tok_s_b1_base"] = b["modeled"]["points"][0]["tokens_per_s"]
        row["modeled_tok_s_bmax"] = r["modeled"]["points"][-1]["tokens_per_s"]
        row["modeled_bmax"] = r["modeled"]["points"][-1]["batch"]
        row["modeled_usd_per_mtok_b1"] = p["usd_per_mtok"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["cpu", "h200"])
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--no-cache", action="store_true", help="recompute every stage (true compression times)")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.recipes:
        for target in args.targets:
            print(f"running {name} --target {target} ...", file=sys.stderr, flush=True)
            path = Path(name) if name.endswith((".yaml", ".yml")) else repo / "recipes" / f"{name}.yaml"
            rows.append(run_one(path, target, out / f"{path.stem}-{target}", args.no_cache))
    cols = ["recipe", "target", "ppl_base[python-docs]", "ppl[python-docs]", "ppl[shakespeare]", "kl[python-docs]",
            "top1[python-docs]", "params_m", "nonzero_m", "model_mb", "ort_decode_ms", "modeled_tok_s_b1",
            "modeled_tok_s_bmax", "compress_s", "wall_s", "peak_rss_mb", "gates_passed"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                                       for c in cols) + " |")
    if len({r["eval"] for r in rows}) > 1:
        lines.append("\nWARNING: the recipes' eval sections differ; their perplexities are not comparable.")
    print("\n".join(lines))
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    first = [r for r in rows if r["target"] == args.targets[0]]
    pts = [{"name": "baseline", "m": first[0]["baseline_params_m"], "ppl": first[0]["ppl_base[python-docs]"]}]
    pts += [{"name": r["recipe"], "m": r["nonzero_m"], "ppl": r["ppl[python-docs]"]} for r in first]
    (out / "params.svg").write_text(scatter_svg(pts, "m", "ppl", title="perplexity vs nonzero parameters",
                                                x_label="nonzero parameters (M)",
                                                y_label="perplexity (python-docs, held out)"))
    pts = [{"name": f"{r['recipe']} ({r['target']})", "mb": r["model_mb"], "ppl": r["ppl[python-docs]"]}
           for r in rows if r["target"] == args.targets[0]]
    pts.append({"name": "fp32 baseline", "mb": rows[0]["baseline_model_mb"], "ppl": rows[0]["ppl_base[python-docs]"]})
    (out / "pareto.svg").write_text(scatter_svg(pts, "mb", "ppl", title="SmolLM2-135M: perplexity vs model size",
                                                x_label="model MB (weights as stored)",
                                                y_label="perplexity (python-docs, held out)"))
    print(f"wrote {out / 'bench.json'} and {out / 'pareto.svg'}", file=sys.stderr)


if __name__ == "__main__":
    main()
