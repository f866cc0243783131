"""Where a decode step's time goes in ONNX Runtime: per-op-type kernel time of one token on a KV cache, from
ORT's own profiler, for one or more exported graphs side by side.

    python -m compressor.eval.bench.ort_profile --out DIR NAME=model.onnx [NAME=model.onnx ...]

It separates the weight matmuls (MatMul, MatMulNBits, MatMulIntegerToFloat, ...: what quantization shrinks)
from everything else (norms, RoPE, KV concatenation, attention, the executor's per-node cost: what it does not
shrink), which bounds the decode speed-up any weight format can give: with F the fixed part,
speed-up = (W_fp32 + F) / (W_q + F). Writes ort_profile.json and ort_profile.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

WEIGHT_OPS = {"MatMul", "FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul",
              "DynamicQuantizeMatMul", "Gemm"}


def decode_feeds(sess, past_len: int) -> dict[str, np.ndarray]:
    """One new token (id 1) at position past_len, on a zero KV cache of past_len entries, batch 1."""
    feeds = {"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, past_len + 1), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            _, heads, _, dim = i.shape
            feeds[i.name] = np.zeros((1, heads, past_len, dim), np.float32)
    return feeds


def profile(path: Path, reps: int, warmup: int, past_len: int, threads: int | None, nbits_accuracy: int) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(nbits_accuracy))
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = decode_feeds(sess, past_len)
    for _ in range(warmup):
        sess.run(None, feeds)
    wall = []
    for _ in range(reps):  # unprofiled: the wall time per step
        t0 = time.perf_counter()
        sess.run(None, feeds)
        wall.append((time.perf_counter() - t0) * 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        prof_sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + reps):
            prof_sess.run(None, feeds)
        events = json.loads(Path(prof_sess.end_profiling()).read_text())
    runs = warmup + reps
    us, count = Counter(), Counter()
    run_us = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            us[op] += e["dur"]
            count[op] += 1
    per_op = {op: {"ms": round(us[op] / runs / 1e3, 3), "nodes": round(count[op] / runs)} for op, _ in us.most_common()}
    weight_ms = sum(v["ms"] for op, v in per_op.items() if op in WEIGHT_OPS)
    kernel_ms = sum(v["ms"] for v in per_op.values())
    median = statistics.median(wall)
    q = np.percentile(wall, [25, 75])
    profiled = sum(run_us) / max(len(run_us), 1) / 1e3  # the profiled runs' own step time (profiling costs some)
    return {"path": str(path), "wall_ms_median": round(median, 2), "wall_ms_iqr": [round(float(x), 2) for x in q],
            "profiled_step_ms": round(profiled, 2), "kernel_ms": round(kernel_ms, 2),
            "weight_matmul_ms": round(weight_ms, 2), "other_kernels_ms": round(kernel_ms - weight_ms, 2),
            "executor_ms": round(profiled - kernel_ms, 2), "fixed_ms": round(profiled - weight_ms, 2),
            "fixed_share": round((profiled - weight_ms) / profiled, 3),
            "nodes_per_step": sum(v["nodes"] for v in per_op.values()), "per_op": per_op}


def table(results: dict[str, dict], top: int = 12) -> str:
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows = [("decode step, wall ms median [IQR]",
             lambda r: f"{r['wall_ms_median']:.2f} [{r['wall_ms_iqr'][0]:.2f}-{r['wall_ms_iqr'][1]:.2f}]"),
            ("profiled step ms (mean)", lambda r: f"{r['profiled_step_ms']:.2f}"),
            ("weight matmul kernels ms", lambda r: f"{r['weight_matmul_ms']:.2f}"),
            ("other kernels ms", lambda r: f"{r['other_kernels_ms']:.2f}"),
            ("executor (step - kernels) ms", lambda r: f"{r['executor_ms']:.2f}"),
            ("fixed part (step - weight matmuls) ms", lambda r: f"{r['fixed_ms']:.2f} ({r['fixed_share']:.0%})"),
            ("nodes run per step", lambda r: str(r["nodes_per_step"]))]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(results[n]) for n in names) + " |")
    ops = Counter()
    for r in results.values():
        for op, v in r["per_op"].items():
            ops[op] = max(ops[op], v["ms"])
    for op, _ in ops.most_common(top):
        cells = [f"{r['per_op'][op]['ms']:.2f} (x{r['per_op'][op]['nodes']})" if op in r["per_op"] else "-"
                 for r in results.values()]
        lines.append(f"| {op} ms (nodes) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("graphs", nargs="+", help="NAME=path/to/model.onnx")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--past", type=int, default=128, help="KV cache length before the decoded token")
    ap.add_argument("--threads", type=int, help="ORT intra-op threads (default: the cores available)")
    ap.add_argument("--matmul-nbits-accuracy", type=int, default=4, choices=[0, 4],
                    help="session.qdq_matmulnbits_accuracy_level (the deploy recipes' MatMulNBits use 4)")
    args = ap.parse_args(argv)
    graphs = {}
    for g in args.graphs:
        name, sep, path = g.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"expected NAME=path/to/model.onnx with an existing file, got {g!r}")
        graphs[name] = Path(path)
    results = {n: profile(p, args.reps, args.warmup, args.past, args.threads, args.matmul_nbits_accuracy)
               for n, p in graphs.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = (f"ONNX Runtime decode step profile: 1 token on a {args.past}-token cache, batch 1, {args.reps} steps after "
          f"{args.warmup} warm-up\n\n" + table(results))
    (out / "ort_profile.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2) + "\n")
    (out / "ort_profile.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
