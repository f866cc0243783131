"""The tensorrt ONNX flavour of SmolLM2 for each scheme (FP32, INT8 W8A8 static, INT4 W4A16, FP8 W8A8 static):
export time, TensorRT rules findings, and ONNX Runtime against the quantized torch model on untraced shapes.

    python -m compressor.eval.bench.onnx_schemes --out DIR [--model asset:smollm2-135m]

Weights by RTN; static activation scales from 8 x 256 calibration tokens (python-docs + shakespeare, seed 0).
With static activation scales the graph is compared with its activation Q/DQ bypassed (and each pair checked
against the calibrated scale); the end-to-end error with the pairs in place is reported beside it, not gated
(see compressor.onnx_lowering on rounding flips). Writes onnx_schemes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SCHEMES = {
    "fp32": None,
    "int8-w8a8-static": {"format": "int8", "activations": {"format": "int8", "dynamic": False, "observer": "mse"}},
    "int4-w4a16-g64": {"format": "int4", "granularity": "per_group", "group_size": 64},
    "fp8-w8a8-static": {"format": "fp8", "activations": {"format": "fp8", "dynamic": False}},
}
CASES = ((1, 5, 0), (3, 1, 7), (2, 6, 3), (1, 1, 0))


def check_scheme(model_source: str, name: str, cfg: dict | None, out: Path) -> dict:
    import onnx

    from compressor import tensorrt_rules
    from compressor.calibration.data import calibration_windows
    from compressor.context import RunContext
    from compressor.model import load_model
    from compressor.onnx_export import export_causal_lm, verify_against_torch
    from compressor.onnx_lowering import check_activation_qdq, static_activation_layers
    from compressor.recipe import ModelSpec
    from compressor.registry import get_pass
    from compressor.targets import get_target

    h = load_model(ModelSpec(source=model_source))
    if cfg:
        calib = calibration_windows(h.tokenizer, ["asset:python-docs", "asset:shakespeare"], 8, 256, 0)
        ctx = RunContext(get_target("h200"), out, out, quiet=True, calibration=lambda: calib, cache_enabled=False)
        rtn = get_pass("quantize_rtn")
        rtn.run(h, rtn.config(**cfg), ctx)
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    forms = export_causal_lm(h.model, path, opset=21, flavour="tensorrt")
    secs = time.perf_counter() - t0
    findings = tensorrt_rules.check(path)
    static = static_activation_layers(h.model)
    problems = check_activation_qdq(onnx.load(str(path), load_external_data=False), static) if static else []
    checks = verify_against_torch(h.model, path, cases=CASES, bypass_activations=bool(static))
    e2e = verify_against_torch(h.model, path, cases=CASES[:2]) if static else checks
    return {"scheme": name, "lowered": forms, "export_s": round(secs, 1), "rules_findings": [str(f) for f in findings],
            "activation_qdq_checked": len(static), "activation_qdq_problems": problems,
            "max_rel_error": max(c["max_rel_error"] for c in checks),
            "end_to_end_max_rel_error": max(c["max_rel_error"] for c in e2e),
            "mb": round(path.stat().st_size / 1e6, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| scheme | lowered | export s | rules findings | max rel. error (Q/DQ bypassed where static) | "
             "end to end (not gated) | MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['lowered'] or '-'} | {r['export_s']} | {len(r['rules_findings'])} | "
                     f"{r['max_rel_error']:.2g} | {r['end_to_end_max_rel_error']:.2g} | {r['mb']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="asset:smollm2-135m")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cfg in SCHEMES.items():
        rows.append(check_scheme(args.model, name, cfg, out))
        print(json.dumps(rows[-1]), flush=True)
    (out / "onnx_schemes.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = table(rows)
    (out / "onnx_schemes.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
