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
    from compressor.eval import task_runner
    from compressor.eval.metrics import compare_models
    from compressor.model import load_model

    ev = recipe.eval
    encoder = handle.is_encoder
    # Latency is measured in ONNX Runtime on this machine: prefer the flavour built for it (the TensorRT-shaped
    # S8S8 QDQ graph runs 3-7x slower than FP32 there and would misstate the cost).
    onnx_arts = sorted((a for a in artifacts if a["kind"] == "onnx"),
                       key=lambda a: {"ort": 0, "reference": 1}.get(a.get("flavour", "reference"), 2))
    onnx_art = onnx_arts[0] if onnx_arts else None
    # Tokenized first: the cache key holds the evaluated tokens (sentences, task items), so edited eval files are
    # never served stale.
    if encoder:
        from compressor.eval.embeddings import held_out_sentences

        windows = {d.name: _sentences(held_out_sentences, d, ev, recipe.seed) for d in ev.datasets}
        window_keys = {n: key_of(w) for n, w in windows.items()}
        items = {}
    else:
        windows = {d.name: _windows(eval_windows, handle.tokenizer, d, ev) for d in ev.datasets}
        window_keys = {n: sha256_tensor(w) for n, w in windows.items()}
        items = task_runner.build_task_items(recipe)
    # Intervals are computed from the cached per-window sums, so changing their settings reuses the forward passes.
    key = key_of("eval", stage_key, ev.model_dump(mode="json", exclude={"intervals"}), onnx_art and onnx_art["sha256"],
                 target.name, window_keys, key_of(items), task_runner.lm_eval_fingerprint(recipe))
    cached = cache.get_json("eval", key)
    if cached is not None:
        log.info("eval: reusing cached metrics")
        return add_intervals(recipe, cached["baseline"], cached["result"]) + (cached["notes"],)

    log.info("eval: loading the baseline %s", recipe.model.source)
    base = load_model(recipe.model)
    baseline = {"eval_sets": {}}
    result = {"eval_sets": {}}
    notes = []
    if encoder:
        _encoder_quality(recipe, base, handle, windows, baseline, result, notes)
    else:
        for d in ev.datasets:
            log.info("eval %s: %d windows x %d tokens (held out)", d.name, ev.num_windows, ev.seq_len)
            b, r = compare_models(base.model, handle.model, windows[d.name], ctx.progress)
            baseline["eval_sets"][d.name], result["eval_sets"][d.name] = b, r
            log.info("eval %s: perplexity %.4f -> %.4f, KL %.5f, top-1 %.4f", d.name, b["perplexity"],
                     r["perplexity"], r["kl_divergence"], r["top1_agreement"])
        primary = ev.datasets[0].name
        for k in ("perplexity",):
            baseline[k] = baseline["eval_sets"][primary][k]
        for k in ("perplexity", "kl_divergence", "top1_agreement"):
            result[k] = result["eval_sets"][primary][k]
    if ev.tasks or ev.lm_eval:
        if encoder:
            notes.append("task accuracy not measured: an encoder has no next-token log-likelihoods to score "
                         "multiple-choice items with")
        else:
            tasks = task_runner.run(recipe, {"baseline": base.model, "result": handle.model}, handle.tokenizer,
                                    items, ctx.progress)
            baseline["tasks"], result["tasks"] = tasks["baseline"], tasks["result"]
            for name, r in result["tasks"].items():
                log.info("task %s: accuracy %.4f -> %.4f (%d items)", name, baseline["tasks"][name]["accuracy"],
                         r["accuracy"], r["items"])
    for metrics, model in ((baseline, base.model), (result, handle.model)):
        metrics["model_bytes"] = state_bytes(model)
        metrics["parameters"], metrics["nonzero_parameters"] = parameter_counts(model)

    lat = ev.latency
    if lat.enabled and onnx_art is not None and not encoder:
        _latency(recipe, handle, base, ctx, cache, onnx_art, baseline, result)
    elif lat.enabled and encoder:
        notes.append("latency not measured: the ONNX latency harness runs causal LMs with a KV cache; this model "
                     "is an encoder")
    elif lat.enabled:
        notes.append("latency not measured: the recipe exports no ONNX graph (add {pass: export_onnx} to export:)")
    if ev.throughput.enabled:
        _throughput(recipe, handle, base, ctx, onnx_art, baseline, result, notes)
    _modeled(recipe, target, base, handle, baseline, result, notes)
    cache.put_json("eval", key, {"baseline": baseline, "result": result, "notes": notes})
    return add_intervals(recipe, baseline, result) + (notes,)


def _sentences(held_out_sentences, d, ev, seed: int) -> list[str]:
    from compressor.errors import InputError

    try:
        return held_out_sentences(d.source, ev.embeddings.num_sentences, seed, d.text_field, d.split)
    except InputError as e:
        raise InputError(f"eval set {d.name!r}: {e}") from None


def _encoder_quality(recipe, base, handle, sentences: dict, baseline: dict, result: dict, notes: list) -> None:
    """Embedding fidelity on every eval set; the primary set's mean and minimum cosine at the top level."""
    from compressor.eval.embeddings import fidelity

    ev = recipe.eval
    for d in ev.datasets:
        r = fidelity(base.model, handle.model, handle.tokenizer, sentences[d.name], ev.embeddings.max_tokens,
                     ev.embeddings.batch_size)
        baseline["eval_sets"][d.name] = {"sentences": r["sentences"]}
        result["eval_sets"][d.name] = r
        log.info("eval %s: embedding cosine to the original mean %.6f, min %.6f over %d held-out sentences", d.name,
                 r["embedding_cosine"], r["embedding_cosine_min"], r["sentences"])
    primary = result["eval_sets"][ev.datasets[0].name]
    result["embedding_cosine"], result["embedding_cosine_min"] = primary["embedding_cosine"], \
        primary["embedding_cosine_min"]
    notes.append(f"perplexity, KL divergence and top-1 agreement not measured: {type(handle.model).__name__} is an "
                 "encoder (no next-token distribution); quality is embedding fidelity, the cosine of mean-pooled "
                 "sentence embeddings to the original's on held-out sentences")


def _latency(recipe, handle, base, ctx, cache, onnx_art, baseline: dict, result: dict) -> None:
    from compressor.eval.measure import ort_latency

    lat = recipe.eval.latency
    opset = onnx_opset(ctx.workdir / onnx_art["path"])
    with tempfile.TemporaryDirectory(prefix="compressor-baseline-") as scratch:
        paths = {"baseline": str(_baseline_onnx(base, cache, opset, Path(scratch))),
                 "result": str(ctx.workdir / onnx_art["path"])}
        lats = ort_latency(paths, lat.prompt_len, lat.decode_tokens, lat.repetitions, lat.warmup, lat.threads,
                           vocab_size=handle.config.vocab_size)
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


def _throughput(recipe, handle, base, ctx, onnx_art, baseline: dict, result: dict, notes: list) -> None:
    """Measured tokens/s at eval.throughput.batch_sizes: torch CPU for both models; ONNX Runtime CPU for the
    result's exported graph (and the baseline's, when its export is cached or cheap: not attempted here)."""
    from compressor.eval import measure

    tp = recipe.eval.throughput
    if handle.is_encoder:
        fn = measure.torch_encoder_throughput
        args = (tp.batch_sizes, tp.prompt_len, tp.repetitions, tp.warmup, tp.threads)
    else:
        fn = measure.torch_throughput
        args = (tp.batch_sizes, tp.prompt_len, tp.decode_tokens, tp.repetitions, tp.warmup, tp.threads)
    runs = fn({"baseline": base.model, "result": handle.model}, *args, vocab_size=handle.config.vocab_size)
    for name, metrics in (("baseline", baseline), ("result", result)):
        metrics["throughput"] = [runs[name]]
    if onnx_art is not None and not handle.is_encoder:
        result["throughput"].append(measure.ort_throughput(str(ctx.workdir / onnx_art["path"]), tp.batch_sizes,
                                                           tp.prompt_len, tp.decode_tokens, tp.repetitions,
                                                           tp.warmup, tp.threads, handle.config.vocab_size))
    elif not handle.is_encoder:
        notes.append("throughput measured with torch only: the recipe exports no ONNX graph for ONNX Runtime")


def _modeled(recipe, target, base, handle, baseline: dict, result: dict, notes: list) -> None:
    from compressor.eval import cost_model

    ev = recipe.eval
    if not target.is_gpu:
        notes.append("target cpu: cost is measured on this machine; no modeled GPU cost")
    elif handle.is_encoder:
        notes.append(f"no modeled {target.name} cost: the roofline models decode steps of causal LMs; this model is "
                     "an encoder")
    else:
        baseline["modeled"] = cost_model.model_cost(target, base.model, ev.batch_sizes, ev.seq_len,
                                                    usd_per_hour=ev.usd_per_hour)
        result["modeled"] = cost_model.model_cost(target, handle.model, ev.batch_sizes, ev.seq_len,
                                                  usd_per_hour=ev.usd_per_hour)


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
        if "sentence_cosine" in r:  # an encoder's embedding fidelity
            from compressor.eval.embeddings import intervals

            r["embedding_intervals"] = intervals(r["sentence_cosine"], iv.level, iv.resamples, seed)
            continue
        win = stats.window_inputs(baseline["eval_sets"][name], r)
        if win is None:
            continue
        r["intervals"] = stats.quality_intervals(**win, level=iv.level, resamples=iv.resamples, seed=seed)
        baseline["eval_sets"][name]["intervals"] = {"perplexity": r["intervals"]["perplexity_baseline"]}
    primary = next(iter(result.get("eval_sets", {})), None)
    if primary and "intervals" in result["eval_sets"][primary]:
        result["intervals"] = result["eval_sets"][primary]["intervals"]
        baseline["intervals"] = baseline["eval_sets"][primary]["intervals"]
    if result.get("tasks"):
        from compressor.eval import task_runner

        task_runner.add_intervals(recipe, baseline, result, seed)
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
        if owner in qmods and leaf != "bias":  # a quantized layer's bias stays a float parameter
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
