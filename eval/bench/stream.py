"""Benchmark: streaming compression of checkpoints larger than memory, peak RSS measured against the plan.

    python -m compressor.eval.bench.stream --runs rtn fp8 --model-7b /tmp/synth7b --generate
    python -m compressor.eval.bench.stream --runs gptq --model-1b /tmp/synth1b --generate --samples 16 --seq-len 512

Each run is `compress RECIPE --target h200 --model DIR --out OUT --quiet` as a child process; its peak resident
set is the kernel's (os.wait4's ru_maxrss of exactly that child), and the estimate is `compress plan --json`'s
peak_memory_bytes for the same command. Runs: `rtn` = recipes/stream-w4a16-rtn.yaml and `fp8` =
recipes/stream-fp8.yaml on the Llama-2-7B-shaped checkpoint; `gptq` = a GPTQ INT4 g128 recipe written here
(calibration: the seeded mix of asset:python-docs and asset:shakespeare) on the 1B-shaped one. With --generate
a missing checkpoint is generated first (python -m compressor.eval.fixtures synthetic-llama). Each output is
deleted after it is measured (--keep keeps them). Prints a table, writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMITS_GB = {"rtn": 4.0, "fp8": 4.0, "gptq": 3.0}  # the bars for peak RSS


def _gb(folder: Path, pattern: str = "*.safetensors") -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob(pattern)) / 1e9


def shape_of(folder: Path) -> str:
    c = json.loads((Path(folder) / "config.json").read_text())
    return f"{c['num_hidden_layers']}L h{c['hidden_size']} i{c['intermediate_size']}"


def gptq_recipe(path: Path, samples: int, seq_len: int) -> Path:
    path.write_text(f"""schema_version: 1
name: stream-gptq-bench
model: {{source: asset:smollm2-135m, dtype: bfloat16, streaming: true}}
calibration: {{source: [asset:python-docs, asset:shakespeare], num_samples: {samples}, seq_len: {seq_len}}}
passes:
  - {{pass: quantize_gptq, format: int4, group_size: 128, symmetric: true}}
export:
  - {{pass: export_checkpoint}}
""")
    return path


def measure(cmd: list[str]) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS in GB of exactly this child, stderr tail)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    for line in p.stderr:  # drained so the child never blocks on a full pipe
        err_lines = (err_lines + [line])[-20:]
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024 / 1e9, "".join(err_lines)


def plan_estimate(recipe: Path, model: Path) -> float:
    out = subprocess.run([sys.executable, "-m", "compressor", "plan", str(recipe), "--target", "h200", "--model",
                          str(model), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["estimate"]["peak_memory_bytes"] / 1e9


def ensure_model(folder: Path, shape: str, generate: bool) -> None:
    if (folder / "config.json").is_file():
        return
    if not generate:
        raise SystemExit(f"{folder} does not exist; pass --generate to create it (shape {shape})")
    cmd = [sys.executable, "-m", "compressor.eval.fixtures", "synthetic-llama", "--shape", shape, "--out",
           str(folder), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"generated {shape} in {folder}: {_gb(folder):.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compressor.eval.bench.stream", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", choices=["rtn", "fp8", "gptq"], default=["rtn", "fp8", "gptq"])
    ap.add_argument("--model-7b", type=Path, default=Path("/tmp/synth7b"))
    ap.add_argument("--model-1b", type=Path, default=Path("/tmp/synth1b"))
    ap.add_argument("--generate", action="store_true", help="generate a missing synthetic checkpoint first")
    ap.add_argument("--samples", type=int, default=16, help="GPTQ calibration windows")
    ap.add_argument("--seq-len", type=int, default=512, help="GPTQ calibration window length")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stream-bench"), help="outputs (deleted after each)")
    ap.add_argument("--keep", action="store_true", help="keep the compressed outputs")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = {"rtn": (REPO / "recipes/stream-w4a16-rtn.yaml", args.model_7b, "llama-2-7b"),
            "fp8": (REPO / "recipes/stream-fp8.yaml", args.model_7b, "llama-2-7b"),
            "gptq": (gptq_recipe(args.work / "stream-gptq.yaml", args.samples, args.seq_len), args.model_1b,
                     "llama-1b")}
    rows = []
    for name in args.runs:
        recipe, model, shape = runs[name]
        ensure_model(model, shape, args.generate)
        out = args.work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        estimate = plan_estimate(recipe, model)
        cmd = [sys.executable, "-m", "compressor", str(recipe), "--target", "h200", "--model", str(model), "--out",
               str(out), "--quiet", "--no-cache"]
        rc, secs, peak, err = measure(cmd)
        row = {"run": name, "recipe": str(recipe.relative_to(REPO) if recipe.is_relative_to(REPO) else recipe.name),
               "shape": shape_of(model), "input_gb": round(_gb(model), 3), "output_gb": round(_gb(out), 3) if rc == 0 else None,
               "seconds": round(secs, 1), "peak_rss_gb": round(peak, 3), "estimate_gb": round(estimate, 3),
               "ratio": round(peak / estimate, 3), "limit_gb": LIMITS_GB[name], "exit_code": rc,
               "command": " ".join(["compress", *cmd[3:]])}
        if name == "gptq":
            row["calibration"] = f"{args.samples} x {args.seq_len}"
        if rc != 0:
            row["error"] = err.strip().splitlines()[-1] if err.strip() else ""
            print(err, file=sys.stderr)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    head = f"{'recipe':34} {'shape':19} {'in GB':>6} {'out GB':>7} {'time s':>7} {'peak RSS GB':>11} " \
           f"{'plan GB':>8} {'ratio':>6} {'limit':>6}"
    print(head)
    for r in rows:
        out_gb = f"{r['output_gb']:.2f}" if r["output_gb"] is not None else "-"
        print(f"{r['recipe']:34} {r['shape']:19} {r['input_gb']:6.2f} {out_gb:>7} {r['seconds']:7.0f} "
              f"{r['peak_rss_gb']:11.2f} {r['estimate_gb']:8.2f} {r['ratio']:6.2f} {r['limit_gb']:6.1f}"
              + ("" if r["exit_code"] == 0 else f"  FAILED exit {r['exit_code']}"))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
