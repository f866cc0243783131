"""validate -> plan -> run -> evaluate -> report, into one atomically written output folder.

The same `run_recipe` serves the CLI and the Python API:

    from compressor.pipeline import run_recipe
    summary = run_recipe("recipes/quickstart.yaml", target="cpu", out="out/quickstart")
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from compressor import assets
from compressor.artifacts import atomic_output, check_output, describe_artifact, inside, versions
from compressor.cache import Cache, key_of, sha256_tensor
from compressor.context import RunContext
from compressor.errors import CompressorError, GateFailed, InputError, PassError
from compressor.plan import Plan, PlannedPass, build_plan
from compressor.registry import Artifact
from compressor.recipe import load_recipe
from compressor.targets import get_target

log = logging.getLogger("compressor")


@dataclass
class RunSummary:
    out: Path
    report: dict
    gates_failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        m = self.report["result"]["metrics"]
        return {"out": str(self.out), "ok": not self.gates_failed, "seconds": round(self.seconds, 2),
                "perplexity": m.get("perplexity"), "baseline_perplexity": self.report["baseline"]["metrics"].get("perplexity"),
                "kl_divergence": m.get("kl_divergence"), "top1_agreement": m.get("top1_agreement"),
                "model_bytes": m.get("model_bytes"), "gates": self.report["gates"],
                "artifacts": self.report["artifacts"]}


def load_and_plan(recipe_path: str, target: str, overrides=(), model_override: str | None = None) -> Plan:
    recipe, lines = load_recipe(recipe_path, overrides, model_override)
    return build_plan(recipe, get_target(target), lines)


def _run_pass(p: PlannedPass, handle, ctx: RunContext, before: list[str]):
    import psutil

    from compressor.eval.measure import peak_rss_mb

    t0 = time.perf_counter()
    rss_before = psutil.Process().memory_info().rss / 2**20
    log.info("pass %s: start", p.name)
    try:
        result = p.info.run(handle, p.config, ctx)
    except PassError as e:
        if before and not e.before:  # a pass knows only itself; the pipeline adds what ran before it
            raise PassError(e.pass_name, before, e.detail, exit_code=e.exit_code) from e
        raise
    except CompressorError:
        raise
    except Exception as e:  # noqa: BLE001 - a bug in a pass: keep its traceback, add the context
        raise PassError(p.name, before, f"{type(e).__name__}: {e}") from e
    secs = time.perf_counter() - t0
    # Working memory of the pass: how far the process peak rose above what it held when the pass started (0 when
    # an earlier step had set a higher peak).
    result.info.setdefault("memory_mb", {"rss_before": round(rss_before),
                                         "peak_above_start": round(max(0.0, peak_rss_mb() - rss_before))})
    log.info("pass %s: done in %.1f s", p.name, secs)
    return result, secs


def run_recipe(recipe_path: str, target: str, out: str | Path | None = None, *, overrides=(),
               model_override: str | None = None, overwrite: bool = False, quiet: bool = False,
               use_cache: bool = True) -> RunSummary:
    t_start = time.perf_counter()
    plan = load_and_plan(recipe_path, target, overrides, model_override)
    recipe = plan.recipe
    out = Path(out) if out else Path("out") / recipe.name
    check_output(out, overwrite)  # before loading anything: a refused run costs nothing
    if recipe.model.streaming:  # larger than memory: one decoder block at a time (compressor.streaming)
        from compressor.streaming import run_streaming

        return run_streaming(plan, out, overwrite=overwrite, quiet=quiet, t_start=t_start)
    cache = Cache(assets.home() / "cache", enabled=use_cache)
    from compressor.model import load_model

    with atomic_output(out, overwrite) as tmp:
        ctx = RunContext(plan.target, tmp, cache.root, recipe.seed, quiet, log, cache_enabled=cache.enabled)
        log.info("loading model %s", recipe.model.source)
        handle = load_model(recipe.model)
        n_params = handle.num_parameters()
        import torch

        torch.manual_seed(recipe.seed)
        if recipe.calibration is not None:
            # Tokenized up front, so empty or too-short calibration text fails before any pass runs.
            from compressor.calibration.data import calibration_windows

            c = recipe.calibration
            ctx_len = getattr(handle.config, "max_position_embeddings", None)
            if ctx_len and c.seq_len > ctx_len:
                raise InputError(f"{recipe.path}: calibration.seq_len {c.seq_len} is beyond the model's context "
                                 f"of {ctx_len} tokens (max_position_embeddings of {recipe.model.source})")
            batches = calibration_windows(handle.tokenizer, c.source, c.num_samples, c.seq_len, c.seed,
                                          c.text_field, c.split)
            log.info("calibration: %d x %d tokens from %s (seed %d)", *batches.shape, ", ".join(c.sources), c.seed)
            ctx = RunContext(plan.target, tmp, cache.root, recipe.seed, quiet, log, calibration=lambda: batches,
                             cache_enabled=cache.enabled)
        provenance, artifacts = [], []
        stage_key = _run_transforms(plan, handle, ctx, cache, provenance)
        done = [p["name"] for p in provenance]
        lowered: list = []
        for p in plan.lowerings:
            res, secs, cached = _run_lowering(p, handle, ctx, cache, stage_key, done, lowered)
            lowered.append([p.name, p.config_dict()])
            provenance.append({"name": p.name, "section": p.section, "config": p.config_dict(),
                               "seconds": round(secs, 3), "cached": cached, "info": res.get("info", {})})
            artifacts += [describe_artifact(tmp, a["path"], a["kind"]) | {k: v for k, v in a.items() if k not in ("path", "kind")}
                          for a in res["artifacts"]]
            done.append(p.name)
        compress_seconds = time.perf_counter() - t_start
        from compressor.eval.measure import peak_rss_mb

        # Peak memory up to here: loading, calibration and every pass, before evaluation loads a baseline.
        compress_rss = peak_rss_mb()
        report = _evaluate_and_report(plan, handle, ctx, cache, stage_key, provenance, artifacts, compress_seconds,
                                      n_params, compress_rss)
        manifest = {"schema_version": 1, "recipe": recipe.model_dump(mode="json", exclude={"path"}),
                    "recipe_path": str(recipe.path), "target": plan.target.name, "versions": versions(),
                    "model": {"source": recipe.model.source, "path": handle.path, "sha256": handle.fingerprint},
                    "stage_key": stage_key, "passes": provenance, "artifacts": artifacts}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    summary = RunSummary(out.absolute(), report, [g for g in report["gates"] if not g["passed"]],
                         time.perf_counter() - t_start)
    if summary.gates_failed:
        raise GateFailed("; ".join(g.get("reason", g["metric"]) for g in summary.gates_failed)
                         + f" (report: {out / 'report' / 'report.md'})")
    return summary


def _run_transforms(plan: Plan, handle, ctx, cache: Cache, provenance: list) -> str:
    """Run the passes that change the model, reusing the longest finished prefix from the cache."""
    from compressor.checkpoint_io import save_compressed

    from compressor import __version__

    chain, keys = [], []
    # The calibration tokens themselves (not just the recipe's data settings) key the stages, so an edited
    # calibration file can never reuse a stage calibrated on the old text.
    calib = ctx.calibration() if ctx.calibration is not None else None
    calib_hash = sha256_tensor(calib) if calib is not None else None
    base = key_of("stage", __version__, handle.fingerprint, plan.recipe.model.dtype, plan.recipe.seed, calib_hash)
    for p in plan.transforms:
        chain.append([p.name, p.config_dict()])
        keys.append(key_of(base, chain))
    start = 0
    for i in reversed(range(len(keys))):
        hit = cache.get("stage", keys[i])
        if hit is not None:
            from compressor.model import load_model
            from compressor.recipe import ModelSpec

            log.info("reusing cached result of %s", " -> ".join(n for n, _ in chain[: i + 1]))
            cached = load_model(ModelSpec(source=str(hit / "model"), dtype=plan.recipe.model.dtype))
            handle.model = cached.model
            provenance.extend({**p, "cached": True} for p in json.loads((hit / "provenance.json").read_text()))
            start = i + 1
            break
    before = [p["name"] for p in provenance]
    fresh = []
    for p in plan.transforms[start:]:
        res, secs = _run_pass(p, handle, ctx, before)
        fresh.append({"name": p.name, "section": p.section, "config": p.config_dict(), "seconds": round(secs, 3),
                      "cached": False, "info": res.info})
        before.append(p.name)
    provenance.extend(fresh)
    # A pass stopped by its own budget (distill's max_minutes) is not a finished stage: a rerun must resume it
    # from its checkpoint instead of reusing the partial model.
    partial = [f["name"] for f in fresh if (f["info"] or {}).get("stopped_early")]
    if partial:
        log.warning("not caching this stage: %s stopped early (a rerun resumes it)", ", ".join(partial))
    if fresh and cache.enabled and not partial:
        def build(d: Path) -> None:
            (d / "model").mkdir()
            save_compressed(handle.model, handle.tokenizer, d / "model")
            (d / "provenance.json").write_text(json.dumps(provenance, indent=1, default=str))

        cache.put("stage", keys[-1], build)
    return keys[-1] if keys else base


def _run_lowering(p: PlannedPass, handle, ctx: RunContext, cache: Cache, stage_key: str, before: list[str],
                  prior: list):
    """Run a lowering pass, or copy its output folder from the cache when the same stage was lowered before."""
    # A pass over an earlier artifact (an engine build over the ONNX export) depends on how that was made too.
    upstream = [] if p.info.consumes is Artifact.TORCH_MODEL else prior
    key = key_of("lower", stage_key, p.name, p.config_dict(), upstream)
    hit = cache.get("lower", key)
    if hit is not None:
        meta = json.loads((hit / "result.json").read_text())
        for name in meta["folders"]:  # a tampered entry cannot copy outside the output folder
            shutil.copytree(inside(hit, name), inside(ctx.workdir, name))
        log.info("pass %s: reused from cache", p.name)
        return meta, 0.0, True
    res, secs = _run_pass(p, handle, ctx, before)
    folders = sorted({a["path"].split("/")[0] for a in res.artifacts})
    meta = {"artifacts": res.artifacts, "info": res.info, "folders": folders}
    if cache.enabled:
        def build(d: Path) -> None:
            for name in folders:
                shutil.copytree(ctx.workdir / name, d / name)
            (d / "result.json").write_text(json.dumps(meta, default=str))

        cache.put("lower", key, build)
    return meta, secs, False


def _model_notes(recipe) -> list[str]:
    if recipe.model.trust_remote_code:
        return [f"WARNING: trust_remote_code was on (model.trust_remote_code): this run ran code shipped with the "
                f"checkpoint {recipe.model.source}"]
    return []


def _evaluate_and_report(plan: Plan, handle, ctx, cache, stage_key, provenance, artifacts, compress_seconds,
                         n_params: int, compress_rss: float) -> dict:
    from compressor.eval import gates as gates_mod
    from compressor.eval import harness, report as report_mod
    from compressor.eval.measure import peak_rss_mb

    recipe = plan.recipe
    baseline, result, notes = {}, {}, []
    if recipe.eval is not None:
        baseline, result, notes = harness.evaluate(recipe, plan.target, handle, ctx, cache, stage_key, artifacts)
    result["compress_seconds"] = compress_seconds
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_rss_mb_compress"] = compress_rss
    gate_results = gates_mod.evaluate(recipe.gates, baseline, result)
    report = {
        "schema_version": report_mod.REPORT_SCHEMA_VERSION,
        "model": {"source": recipe.model.source, "sha256": handle.fingerprint, "parameters": n_params,
                  "architecture": type(handle.model).__name__},
        "target": plan.target.name,
        "recipe": {"name": recipe.name, "path": str(recipe.path)},
        "passes": [{"name": p["name"], "config": p["config"], "seconds": p["seconds"], "cached": p["cached"],
                    "info": p.get("info", {})} for p in provenance],
        "baseline": {"metrics": baseline},
        "result": {"metrics": result},
        "variants": [{"name": recipe.name, "metrics": result, "artifacts": [a["path"] for a in artifacts]}],
        "gates": gate_results,
        "artifacts": artifacts,
        # Passes say what they could not do (e.g. "engine not built: TensorRT not installed") in info["notes"].
        "notes": _model_notes(recipe) + [n for p in provenance for n in p.get("info", {}).get("notes", [])] + notes,
    }
    report_mod.write(report, ctx.workdir / "report")
    return report
