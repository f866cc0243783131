"""MoE expert trimming and merging on the trained fixtures: which experts to drop, and whether merging beats
dropping at the same expert count.

    python -m compressor.eval.bench.moe_trim --out DIR [--fixtures moe-mixtral moe-qwen] [--fractions 0.25 0.5]
        [--seeds 3] [--calib-samples 64] [--calib-len 256] [--windows 16] [--seq-len 256] [--threads 1]

For each fixture (asset:moe-mixtral-fixture, asset:moe-qwen-fixture; trained on first use) and each share of
experts removed (every layer keeps the same count), the experts are chosen by our passes:
  reap, frequency, router_mass   expert_trim with that criterion
  random                         expert_trim criterion random, seeds 0..S-1 (mean and standard deviation)
  merge                          expert_merge at the same count: REAP centres, output similarity, aligned
                                 frequency-weighted averages, the centre's router row (the pass's defaults)
  merge-router-mean, merge-coact the same with router: mean, or grouped by router co-activation
Quality: perplexity on held-out windows of both corpora (documents the fixtures never trained on; the windows the
moe-* recipes evaluate), each set alone and both together, and KL divergence to the fixture. Cost: model bytes
and the modeled decode tokens/s on an H200 (eval.cost_model's roofline over all weights, batch 1 and 64,
context 1024; every expert counts, as at batch sizes that touch them all). Calibration: a seeded 50/50 mix of the
corpora's calibration part; the statistics are computed once per fixture and shared by every variant (cache).
One thread by default: on 2 shared cores one thread ran the fixtures' training 10x faster than two.

Writes moe_trim.json, moe_trim.md (the table) and moe_trim-<fixture>.svg (perplexity increase against experts
removed) into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from compressor.eval.plot import scatter_svg

CORPORA = {"python-docs": "asset:python-docs", "shakespeare": "asset:shakespeare"}
TRIM = ("reap", "frequency", "router_mass")
MERGES = {"merge": {}, "merge-router-mean": {"router": "mean"}, "merge-coact": {"similarity": "coactivation"}}


def _log(t0: float, quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _evaluate(base, model, windows: dict) -> dict:
    from compressor.eval.metrics import compare_models

    out, nll, n = {}, 0.0, 0
    for name, w in windows.items():
        _, r = compare_models(base, model, w)
        out[name] = {"perplexity": r["perplexity"], "kl_divergence": r["kl_divergence"],
                     "top1_agreement": r["top1_agreement"]}
        nll += sum(r["window_nll"])
        n += r["tokens"]
    out["both"] = {"perplexity": math.exp(nll / n),
                   "kl_divergence": statistics.fmean(out[k]["kl_divergence"] for k in windows)}
    return out


def _cost(model) -> dict:
    from compressor.checkpoint_io import state_bytes
    from compressor.eval.cost_model import model_cost
    from compressor.targets import get_target

    c = model_cost(get_target("h200"), model, [1, 64], 1024)
    return {"bytes": state_bytes(model), **{f"tokens_per_s_b{p['batch']}": p["tokens_per_s"] for p in c["points"]}}


def run_fixture(name: str, args, t0: float) -> dict:
    from compressor.calibration.data import calibration_windows, eval_windows
    from compressor.context import RunContext
    from compressor.model import ModelHandle, load_model
    from compressor.recipe import ModelSpec
    from compressor.registry import get_pass
    from compressor.targets import get_target

    handle = load_model(ModelSpec(source=f"asset:{name}-fixture"))
    base, tok = handle.model, handle.tokenizer
    n_exp = base.model.layers[0].mlp.gate.weight.shape[0]
    calib = calibration_windows(tok, list(CORPORA.values()), args.calib_samples, args.calib_len, 0)
    windows = {k: eval_windows(tok, src, args.windows, args.seq_len) for k, src in CORPORA.items()}
    cache = Path(tempfile.mkdtemp(prefix="moe-trim-bench-"))
    ctx = RunContext(get_target("cpu"), cache, cache, quiet=True, calibration=lambda: calib)
    rows = [{"fixture": name, "method": "baseline", "removed": 0.0, "experts": n_exp,
             "metrics": _evaluate(base, base, windows), **_cost(base)}]
    _log(t0, args.quiet, f"{name}: baseline perplexity {rows[0]['metrics']['both']['perplexity']:.2f} "
                         f"({n_exp} experts per layer)")

    def variant(method: str, frac: float, pass_name: str, cfg: dict, seed: int | None = None) -> dict:
        h = ModelHandle(copy.deepcopy(base), tok, handle.source, handle.path, handle.fingerprint)
        t = time.perf_counter()
        info = get_pass(pass_name).run(h, get_pass(pass_name).config(**cfg), ctx).info
        row = {"fixture": name, "method": method, "removed": frac, "experts": info["experts_after"], "seed": seed,
               "seconds": round(time.perf_counter() - t, 1), "metrics": _evaluate(base, h.model, windows),
               "min_router_mass_kept": info.get("min_router_mass_kept"),
               "mean_block_error": info.get("mean_block_error"),
               "min_reap_mass_kept": (min(c["reap_mass"] for c in info["coverage"].values())
                                      if "coverage" in info else None),
               "predicted_risk": info.get("predicted_risk"), **_cost(h.model)}
        _log(t0, args.quiet, f"{name}: {method} -{frac:.0%}{'' if seed is None else f' seed {seed}'}: perplexity "
                             f"{row['metrics']['both']['perplexity']:.2f}")
        return row

    for frac in args.fractions:
        for crit in TRIM:
            rows.append(variant(crit, frac, "expert_trim", {"criterion": crit, "remove_fraction": frac}))
        for s in range(args.seeds):
            rows.append(variant("random", frac, "expert_trim", {"criterion": "random", "remove_fraction": frac,
                                                                 "seed": 1000 * s}, seed=s))
        for method, extra in MERGES.items():
            rows.append(variant(method, frac, "expert_merge", {"remove_fraction": frac, **extra}))
    return {"fixture": name, "experts": n_exp, "architecture": base.config.model_type, "rows": rows}


def summarize(res: dict, fractions: list[float]) -> list[dict]:
    """One line per (fraction, method): random averaged over seeds; the quality-bar comparisons."""
    base = next(r for r in res["rows"] if r["method"] == "baseline")
    b_ppl = base["metrics"]["both"]["perplexity"]
    lines = []
    for frac in fractions:
        by = {}
        for r in res["rows"]:
            if r["removed"] == frac:
                by.setdefault(r["method"], []).append(r)
        for method, rs in by.items():
            ppls = [r["metrics"]["both"]["perplexity"] for r in rs]
            lines.append({"fixture": res["fixture"], "removed": frac, "method": method, "experts": rs[0]["experts"],
                          "n": len(rs), "perplexity": statistics.fmean(ppls),
                          "perplexity_std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                          "increase_pct": 100 * (statistics.fmean(ppls) / b_ppl - 1),
                          "python-docs": statistics.fmean(r["metrics"]["python-docs"]["perplexity"] for r in rs),
                          "shakespeare": statistics.fmean(r["metrics"]["shakespeare"]["perplexity"] for r in rs),
                          "kl": statistics.fmean(r["metrics"]["both"]["kl_divergence"] for r in rs),
                          "bytes": rs[0]["bytes"], "saved_pct": 100 * (1 - rs[0]["bytes"] / base["bytes"]),
                          "tokens_per_s_b1": rs[0]["tokens_per_s_b1"], "tokens_per_s_b64": rs[0]["tokens_per_s_b64"],
                          "min_router_mass_kept": rs[0].get("min_router_mass_kept"),
                          "mean_block_error": statistics.fmean(r["mean_block_error"] for r in rs)
                          if rs[0].get("mean_block_error") is not None else None,
                          "predicted_risk": "/".join(sorted({str(r.get("predicted_risk")) for r in rs}))})
    return lines


def bars(lines: list[dict]) -> list[dict]:
    """The issue's quality bars per fixture and fraction: REAP < frequency < random (perplexity, both sets);
    merge against the best trim at the same count."""
    out = []
    keys = sorted({(ln["fixture"], ln["removed"]) for ln in lines})
    for fx, frac in keys:
        p = {ln["method"]: ln["perplexity"] for ln in lines if ln["fixture"] == fx and ln["removed"] == frac}
        best_trim = min(TRIM, key=lambda m: p[m])
        out.append({"fixture": fx, "removed": frac, "reap_beats_frequency": p["reap"] < p["frequency"],
                    "reap_beats_random": p["reap"] < p["random"],
                    "frequency_beats_random": p["frequency"] < p["random"],
                    "best_trim": best_trim, "merge_vs_best_trim_pct": 100 * (p["merge"] / p[best_trim] - 1),
                    "merge_vs_reap_pct": 100 * (p["merge"] / p["reap"] - 1)})
    return out


def markdown(results: list[dict], lines: list[dict], checks: list[dict], args) -> str:
    out = [f"MoE expert trimming on the fixtures: perplexity on held-out text ({args.windows} x {args.seq_len} tokens "
           f"of each corpus), random = mean ± sd over {args.seeds} seeds; modeled decode on h200 (roofline).", ""]
    for res in results:
        base = next(r for r in res["rows"] if r["method"] == "baseline")
        m = base["metrics"]
        out += [f"**{res['fixture']}** ({res['architecture']}, {res['experts']} experts/layer, top-2): baseline "
                f"perplexity both {m['both']['perplexity']:.2f} (python-docs {m['python-docs']['perplexity']:.2f}, "
                f"shakespeare {m['shakespeare']['perplexity']:.2f}), {base['bytes'] / 1e6:.2f} MB", "",
                "| removed | method | experts | ppl both | Δ% | python-docs | shakespeare | KL | min router mass kept "
                "| block error (risk) | MB | saved | tok/s b1 | tok/s b64 |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for ln in (x for x in lines if x["fixture"] == res["fixture"]):
            ppl = f"{ln['perplexity']:.2f}" + (f" ± {ln['perplexity_std']:.2f}" if ln["n"] > 1 else "")
            mass = "" if ln["min_router_mass_kept"] is None else f"{ln['min_router_mass_kept']:.1%}"
            err = "" if ln["mean_block_error"] is None else f"{ln['mean_block_error']:.2f} ({ln['predicted_risk']})"
            out.append(f"| {ln['removed']:.0%} | {ln['method']} | {ln['experts']} | {ppl} | "
                       f"{ln['increase_pct']:+.1f} | "
                       f"{ln['python-docs']:.2f} | {ln['shakespeare']:.2f} | {ln['kl']:.3f} | {mass} | {err} | "
                       f"{ln['bytes'] / 1e6:.2f} | {ln['saved_pct']:.0f}% | {ln['tokens_per_s_b1']:,.0f} | "
                       f"{ln['tokens_per_s_b64']:,.0f} |")
        out.append("")
    out += ["| fixture | removed | REAP < frequency | REAP < random | frequency < random | merge vs best trim |",
            "|---|---|---|---|---|---|"]
    for c in checks:
        yn = {True: "yes", False: "**no**"}
        out.append(f"| {c['fixture']} | {c['removed']:.0%} | {yn[c['reap_beats_frequency']]} | "
                   f"{yn[c['reap_beats_random']]} | {yn[c['frequency_beats_random']]} | "
                   f"{c['merge_vs_best_trim_pct']:+.1f}% ({c['best_trim']}) |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compressor.eval.bench.moe_trim", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fixtures", nargs="+", default=["moe-mixtral", "moe-qwen"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_fixture(name, args, t0) for name in args.fixtures]
    lines = [ln for r in results for ln in summarize(r, args.fractions)]
    checks = bars(lines)
    md = markdown(results, lines, checks, args)
    (args.out / "moe_trim.md").write_text(md)
    (args.out / "moe_trim.json").write_text(json.dumps(
        {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "results": results, "summary": lines, "bars": checks, "seconds": round(time.perf_counter() - t0, 1)},
        indent=1) + "\n")
    for res in results:
        pts = [{"name": f"{ln['method']} {ln['removed']:.0%}", "x": 100 * ln["removed"], "y": ln["increase_pct"]}
               for ln in lines if ln["fixture"] == res["fixture"] and ln["method"] in ("reap", "frequency", "random",
                                                                                       "merge")]
        (args.out / f"moe_trim-{res['fixture']}.svg").write_text(scatter_svg(
            pts, "x", "y", title=f"{res['fixture']}: perplexity increase vs experts removed",
            x_label="experts removed (%)", y_label="perplexity increase on held-out text (%)"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
