"""The evaluation run: baseline (the model as loaded from the recipe's source) against the result, on every
eval set; measured latency of the ONNX graphs on ONNX Runtime; modeled cost on a GPU target.

Results are cached by (baseline, result stage, eval settings, ONNX artifact hash) so an unchanged rerun
reuses them.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from compressor.cache import Cache, key_of, sha256_tensor

log = logging.getLogger("compressor.eval")


def _baseline_onnx(base_handle, cache: Cache, opset: int, scratch: Path) -> Path:
    """The baseline exported once per model (cached), so its latency can sit beside the result's.
    Without a cache it is exported into `scratch`, a temporary folder the caller removes."""
    from compressor.onnx_export import export_causal_lm

    key = key_of("baseline-onnx", base_handle.fingerprint, opset)
    hit = cache.get("onnx", key)
    if hit is not None:
        return hit / "model.onnx"
    log.info("exporting the baseline to ONNX once, for latency comparison%s", " (cached)" if cache.enabled else "")
    if cache.enabled:
        return cache.put("onnx", key, lambda d: export_causal_lm(base_handle.model, d / "model.onnx", opset=opset)) \
            / "model.onnx"
    export_causal_lm(base_handle.model, scratch / "baseline.onnx", opset=opset)
    return scratch / "baseline.onnx"


def evaluate(recipe, target, handle, ctx, cache: Cache, stage_key: str, artifacts: list[dict]):
    """-> (baseline metrics, result metrics, notes)."""
    from compressor.calibration.data import eval_windows
    from compressor.checkpoint_io import state_bytes
    from compressor.eval import cost_model
    from compressor.eval.metrics import compare_models
    from compressor.model import load_model

    ev = recipe.eval
    # Latency is measured in ONNX Runtime on this machine: prefer the flavour built for it (the TensorRT-shaped
    # S8S8 QDQ graph runs 3-7x slower than FP32 there and would misstate the cost).
    onnx_arts = sorted((a for a in artifacts if a["kind"] == "onnx"),
                       key=lambda a: {"ort": 0, "reference": 1}.get(a.get("flavour", "reference"), 2))
    onnx_art = onnx_arts[0] if onnx_arts else None
    # Tokenized first: the cache key holds the evaluated tokens, so edited eval files are never served stale.
    windows = {d.name: _windows(eval_windows, handle.tokenizer, d, ev) for d in ev.datasets}
    # Intervals are computed from the cached per-window sums, so changing their settings reuses the forward passes.
    key = key_of("eval", stage_key, ev.model_dump(mode="json", exclude={"intervals"}), onnx_art and onnx_art["sha256"],
                 target.name, {n: sha256_tensor(w) for n, w in windows.items()})
    cached = cache.get_json("eval", key)
    if cached is not None:
        log.info("eval: reusing cached metrics")
        return add_intervals(recipe, cached["baseline"], cached["result"]) + (cached["notes"],)

    log.info("eval: loading the baseline %s", recipe.model.source)
    base = load_model(recipe.model)
    baseline = {"eval_sets": {}}
    result = {"eval_sets": {}}
    for d in ev.datasets:
        log.info("eval %s: %d windows x %d tokens (held out)", d.name, ev.num_windows, ev.seq_len)
        b, r = compare_models(base.model, handle.model, windows[d.name], ctx.progress)
        baseline["eval_sets"][d.name], result["eval_sets"][d.name] = b, r
        log.info("eval %s: perplexity %.4f -> %.4f, KL %.5f, top-1 %.4f", d.name, b["perplexity"], r["perplexity"],
                 r["kl_divergence"], r["top1_agreement"])
    primary = ev.datasets[0].name
    for k in ("perplexity",):
        baseline[k] = baseline["eval_sets"][primary][k]
    for k in ("perplexity", "kl_divergence", "top1_agreement"):
        result[k] = result["eval_sets"][primary][k]
    for metrics, model in ((baseline, base.model), (result, handle.model)):
        metrics["model_bytes"] = state_bytes(model)
        metrics["parameters"], metrics["nonzero_parameters"] = parameter_counts(model)
    notes = []

    lat = ev.latency
    if lat.enabled and onnx_art is not None:
        vocab = handle.config.vocab_size
        opset = onnx_opset(ctx.workdir / onnx_art["path"])
        from compressor.eval.measure import ort_latency

        with tempfile.TemporaryDirectory(prefix="compressor-baseline-") as scratch:
            paths = {"baseline": str(_baseline_onnx(base, cache, opset, Path(scratch))),
                     "result": str(ctx.workdir / onnx_art["path"])}
            lats = ort_latency(paths, lat.prompt_len, lat.decode_tokens, lat.repetitions, lat.warmup, lat.threads,
                               vocab_size=vocab)
        b_lat, r_lat = lats["baseline"], lats["result"]
        log.info("latency (ONNX Runtime, batch 1, median of %d): decode %.1f -> %.1f ms/token, prefill %d tokens "
                 "%.0f -> %.0f ms", lat.repetitions, b_lat["latency_ms_decode"]["median"],
                 r_lat["latency_ms_decode"]["median"], lat.prompt_len, b_lat["latency_ms_prefill"]["median"],
                 r_lat["latency_ms_prefill"]["median"])
        for metrics, m in ((baseline, b_lat), (result, r_lat)):
            metrics["latency"] = m
            for k in ("latency_ms_prefill", "latency_ms_decode"):
                metrics[k] = m[k]
            metrics["tokens_per_s"] = m["tokens_per_s"]
    elif lat.enabled:
        notes.append("latency not measured: the recipe exports no ONNX graph (add {pass: export_onnx} to export:)")
    if target.is_gpu:
        baseline["modeled"] = cost_model.model_cost(target, base.model, ev.batch_sizes, ev.seq_len,
                                                    usd_per_hour=ev.usd_per_hour)
        result["modeled"] = cost_model.model_cost(target, handle.model, ev.batch_sizes, ev.seq_len,
                                                  usd_per_hour=ev.usd_per_hour)
    else:
        notes.append("target cpu: cost is measured on this machine; no modeled GPU cost")
    cache.put_json("eval", key, {"baseline": baseline, "result": result, "notes": notes})
    return add_intervals(recipe, baseline, result) + (notes,)


def _windows(eval_windows, tokenizer, d, ev):
    from compressor.errors import InputError

    try:
        return eval_windows(tokenizer, d.source, ev.num_windows, ev.seq_len, d.text_field, d.split)
    except InputError as e:  # name the eval set: one source may serve several
        raise InputError(f"eval set {d.name!r}: {e}") from None


def add_intervals(recipe, baseline: dict, result: dict) -> tuple[dict, dict]:
    """Bootstrap intervals (eval/stats.py) on every eval set, from the per-window sums; the primary set's are
    also at the top level. The settings go into result["bootstrap"] so gates and re-renders use the same draws."""
    from compressor.eval import stats

    iv = recipe.eval.intervals
    seed = recipe.seed if iv.seed is None else iv.seed
    result["bootstrap"] = {"level": iv.level, "resamples": iv.resamples, "seed": seed, "method": stats.METHOD}
    for name, r in result.get("eval_sets", {}).items():
        win = stats.window_inputs(baseline["eval_sets"][name], r)
        if win is None:
            continue
        r["intervals"] = stats.quality_intervals(**win, level=iv.level, resamples=iv.resamples, seed=seed)
        baseline["eval_sets"][name]["intervals"] = {"perplexity": r["intervals"]["perplexity_baseline"]}
    primary = next(iter(result.get("eval_sets", {})), None)
    if primary and "intervals" in result["eval_sets"][primary]:
        result["intervals"] = result["eval_sets"][primary]["intervals"]
        baseline["intervals"] = baseline["eval_sets"][primary]["intervals"]
    return baseline, result


def parameter_counts(model) -> tuple[int, int]:
    """(parameters, nonzero parameters) over unique tensors; a QuantLinear counts its logical weight, nonzero
    where its dequantized weight is (so pruned weights stay visible after quantization)."""
    from compressor.checkpoint_io import unique_state_dict
    from compressor.kernels.qlinear import QuantLinear

    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    total = nonzero = 0
    for k, t in unique_state_dict(model).items():
        owner, _, leaf = k.rpartition(".")
        if owner in qmods:
            if leaf == "weight_packed":
                w = qmods[owner].dequantized_weight()
                total, nonzero = total + w.numel(), nonzero + int((w != 0).sum())
            continue  # scales and zero points are not parameters of the model
        if t.is_floating_point():
            total, nonzero = total + t.numel(), nonzero + int((t != 0).sum())
    return total, nonzero


def onnx_opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
