"""Quantization schemes on the bundled SmolLM2-135M, side by side (and with llm-compressor, if given).

    python -m compressor.eval.bench.quant_schemes --out bench-quant [--no-cache]
        [--llmcompressor-python /path/to/venv/bin/python] [--schemes rtn-w4a16 awq-w4a16 ...]

Each scheme is a shipped recipe (plus --set overrides for the asymmetric variants), run by `compress` in its
own process, so wall time and peak RSS are its own. All calibrated schemes use the same seeded calibration
set and every scheme the same held-out eval windows of both corpora (the recipes share them). With
--llmcompressor-python, llm-compressor (in its own venv) quantizes the same model from exactly the same
calibration token rows (eval/bench/peer_llmcompressor.py), and its model is evaluated here by the same code on
the same windows. Writes quant_schemes.json, quant_schemes.md (table) and quant_schemes.svg (plot).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from compressor.eval.plot import scatter_svg

NO_ONNX = "export=[{pass: export_checkpoint}]"
# name: (recipe, target, overrides, same-bits RTN reference for "share of RTN's loss removed")
SCHEMES = {
    "rtn-w4a16": ("smollm2-w4a16-rtn", "h200", [], None),
    "rtn-w4a16-asym": ("smollm2-w4a16-rtn", "h200", ["passes.0.symmetric=false"], None),
    "awq-w4a16": ("smollm2-w4a16-awq", "h200", [], "rtn-w4a16"),
    "gptq-w4a16": ("smollm2-w4a16-gptq", "h200", [], "rtn-w4a16"),
    "gptq-w4a16-asym": ("smollm2-w4a16-gptq", "h200", ["passes.0.symmetric=false"], "rtn-w4a16-asym"),
    "w8a8-int8": ("smollm2-w8a8-int8", "h200", [], None),
    "w8a8-smoothquant": ("smollm2-w8a8-smoothquant", "h200", [], None),
    "fp8-w8a8": ("smollm2-fp8", "h200", [], None),
    "fp8-weight-only-gptq": ("smollm2-fp8", "h200", ["passes.0.activations=null"], None),
    "fp8-weight-only-rtn": ("smollm2-fp8-weight-rtn", "h200", [], None),
    "w4a8": ("smollm2-w4a8", "h200", [], None),
    "kv-fp8": ("smollm2-kv-fp8", "h200", [], None),
    "nvfp4": ("smollm2-nvfp4", "b200", [], None),
}
# llm-compressor schemes: (peer scheme, our comparable scheme, activation fake-quant at eval)
PEER = {
    "llmc-gptq-w4a16": ("w4a16-g64", "gptq-w4a16", None),
    "llmc-gptq-w4a16-asym": ("w4a16-asym-g64", "gptq-w4a16-asym", None),
    "llmc-sq-gptq-w8a8": ("w8a8-smoothquant-gptq", "w8a8-smoothquant", "int8"),
}
SETS = ("python-docs", "shakespeare")


def run_scheme(repo: Path, name: str, out: Path, no_cache: bool) -> dict:
    recipe, target, overrides, _ = SCHEMES[name]
    cmd = [sys.executable, "-m", "compressor", str(repo / "recipes" / f"{recipe}.yaml"), "--target", target,
           "--out", str(out), "--json", "--quiet", "--overwrite", "--set", NO_ONNX]
    for o in overrides:
        cmd += ["--set", o]
    if no_cache:
        cmd.append("--no-cache")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode not in (0, 1):  # 1: a gate failed, the report is still there
        raise SystemExit(f"{name} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    rep = json.loads((out / "report" / "report.json").read_text())
    b, r = rep["baseline"]["metrics"], rep["result"]["metrics"]
    row = {"scheme": name, "tool": "compressor", "recipe": recipe, "target": target, "overrides": overrides,
           "wall_s": round(wall, 1), "compress_s": round(r["compress_seconds"], 1),
           "pass_s": round(sum(p["seconds"] for p in rep["passes"] if not p["name"].startswith("export_")), 1),
           "cached": any(p["cached"] for p in rep["passes"]),
           "pass_peak_above_start_mb": max([p["info"].get("memory_mb", {}).get("peak_above_start", 0)
                                            for p in rep["passes"] if not p["name"].startswith("export_")] or [0]),
           "peak_rss_mb_compress": round(r["peak_rss_mb_compress"]), "model_mb": round(r["model_bytes"] / 1e6, 1),
           "gates_passed": all(g["passed"] for g in rep["gates"])}
    for s in SETS:
        row[f"ppl_base[{s}]"] = b["eval_sets"][s]["perplexity"]
        row[f"ppl[{s}]"] = r["eval_sets"][s]["perplexity"]
        row[f"kl[{s}]"] = r["eval_sets"][s]["kl_divergence"]
        row[f"top1[{s}]"] = r["eval_sets"][s]["top1_agreement"]
    return row


def peer_tokens(repo: Path, path: Path):
    """The calibration rows our GPTQ/AWQ recipes use, tokenized exactly as compress does."""
    import torch

    from compressor.calibration.data import calibration_windows
    from compressor.model import load_model
    from compressor.recipe import load_recipe

    recipe, _ = load_recipe(repo / "recipes" / "smollm2-w4a16-gptq.yaml")
    c = recipe.calibration
    h = load_model(recipe.model)
    rows = calibration_windows(h.tokenizer, c.source, c.num_samples, c.seq_len, c.seed, c.text_field, c.split)
    torch.save(rows, path)
    return h, recipe


def eval_peer(base, model_dir: Path, recipe, act: str | None) -> dict:
    """Evaluate the peer's (dequantized) model with our metrics on our eval windows; W8A8: int8 per-token
    activation fake-quant on every Linear input but lm_head, as the peer's scheme specifies."""
    from compressor.calibration.data import eval_windows
    from compressor.eval.metrics import compare_models
    from compressor.kernels.fakequant import fake_quant_activation
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    peer = load_model(ModelSpec(source=str(model_dir)))
    if act:
        import torch

        for n, m in peer.model.named_modules():
            if isinstance(m, torch.nn.Linear) and n != "lm_head":
                m.register_forward_pre_hook(lambda mod, a: (fake_quant_activation(a[0], act, True, None),))
    out = {}
    for d in recipe.eval.datasets:
        w = eval_windows(base.tokenizer, d.source, recipe.eval.num_windows, recipe.eval.seq_len, d.text_field, d.split)
        bm, rm = compare_models(base.model, peer.model, w)
        out[d.name] = (bm, rm)
    return out


def run_peers(repo: Path, py: str, out: Path, names: list[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    tokens = out / "calibration_tokens.pt"
    base, recipe = peer_tokens(repo, tokens)
    rows = []
    for name in names:
        scheme, ours, act = PEER[name]
        d = out / name
        cmd = [py, str(repo / "eval" / "bench" / "peer_llmcompressor.py"), "--model", base.path,
               "--calibration-tokens", str(tokens), "--scheme", scheme, "--out", str(d)]
        print(f"running llm-compressor {scheme} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"llm-compressor {scheme} failed:\n{res.stderr[-3000:]}")
        info = json.loads((d / "result.json").read_text())
        row = {"scheme": name, "tool": f"llmcompressor {info.get('version', '')}", "compare_with": ours,
               "wall_s": round(wall, 1), "pass_s": round(info["wall_s"]["oneshot"], 1),
               "peak_rss_mb_compress": round(info["peak_rss_mb"]), "model_mb": None}
        for s, (bm, rm) in eval_peer(base, d / "model", recipe, act).items():
            row[f"ppl_base[{s}]"] = bm["perplexity"]
            row[f"ppl[{s}]"] = rm["perplexity"]
            row[f"kl[{s}]"] = rm["kl_divergence"]
            row[f"top1[{s}]"] = rm["top1_agreement"]
        rows.append(row)
    return rows


def add_gap_removed(rows: list[dict]) -> None:
    """For calibrated INT4 schemes: the share of same-bits RTN's perplexity increase that the method removed."""
    by = {r["scheme"]: r for r in rows if r["tool"] == "compressor"}
    ref_of = {n: SCHEMES[n][3] for n in SCHEMES if SCHEMES[n][3]}
    ref_of.update({"llmc-gptq-w4a16": "rtn-w4a16", "llmc-gptq-w4a16-asym": "rtn-w4a16-asym"})
    for r in rows:
        ref = by.get(ref_of.get(r["scheme"], ""))
        if ref is None:
            continue
        for s in SETS:
            base, rtn, got = r[f"ppl_base[{s}]"], ref[f"ppl[{s}]"], r[f"ppl[{s}]"]
            r[f"rtn_loss_removed[{s}]"] = (rtn - got) / (rtn - base) if rtn > base else None


def table(rows: list[dict]) -> str:
    cols = ["scheme", "tool", "ppl[python-docs]", "ppl[shakespeare]", "kl[python-docs]", "kl[shakespeare]",
            "rtn_loss_removed[python-docs]", "rtn_loss_removed[shakespeare]", "model_mb", "pass_s", "wall_s",
            "peak_rss_mb_compress", "pass_peak_above_start_mb"]
    b = rows[0]
    lines = [f"fp32 baseline perplexity: python-docs {b['ppl_base[python-docs]']:.3f}, "
             f"shakespeare {b['ppl_base[shakespeare]']:.3f}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c.startswith("ppl[") and v is not None:
                s = c[4:-1]
                cells.append(f"{v:.3f} ({100 * (v / r[f'ppl_base[{s}]'] - 1):+.1f}%)")
            elif c.startswith("rtn_loss") and v is not None:
                cells.append(f"{100 * v:.0f}%")
            elif isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append("-" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-quant")
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--no-cache", action="store_true", help="recompute every stage (true compression times)")
    ap.add_argument("--llmcompressor-python", help="python of a venv with llmcompressor installed")
    ap.add_argument("--peers", nargs="+", default=list(PEER), choices=list(PEER))
    ap.add_argument("--append", action="store_true", help="keep the rows already in OUT/quant_schemes.json "
                    "(e.g. to add the peers after the schemes), replacing those run again")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "quant_schemes.json").read_text()) if args.append and (out / "quant_schemes.json").exists() else []
    redo = set(args.schemes) | (set(args.peers) if args.llmcompressor_python else set())
    rows = [r for r in old if r["scheme"] not in redo]
    for name in args.schemes:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(run_scheme(repo, name, out / name, args.no_cache))
        (out / "quant_schemes.json").write_text(json.dumps(rows, indent=2))
    if args.llmcompressor_python:
        rows += run_peers(repo, args.llmcompressor_python, out / "llmcompressor", args.peers)
    add_gap_removed(rows)
    (out / "quant_schemes.json").write_text(json.dumps(rows, indent=2))
    md = table(rows)
    (out / "quant_schemes.md").write_text(md + "\n")
    print(md)
    pts = [{"name": f"{r['scheme']}" + (" (llmc)" if r["tool"] != "compressor" else ""),
            "py": 100 * (r["ppl[python-docs]"] / r["ppl_base[python-docs]"] - 1),
            "sh": 100 * (r["ppl[shakespeare]"] / r["ppl_base[shakespeare]"] - 1)} for r in rows]
    (out / "quant_schemes.svg").write_text(scatter_svg(
        pts, "py", "sh", title="SmolLM2-135M: perplexity increase by scheme (lower left is better)",
        x_label="perplexity increase %, python-docs (held out)", y_label="perplexity increase %, shakespeare (held out)"))
    print(f"wrote {out / 'quant_schemes.json'}, .md and .svg", file=sys.stderr)


if __name__ == "__main__":
    main()
