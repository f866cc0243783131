"""Peer baseline: quantize a HF causal LM with llm-compressor (PyPI `llmcompressor`) and save it dequantized.

Run with the python of a separate venv that has llmcompressor 0.14.x installed (not compressor's venv):

    /work/llmc-venv/bin/python eval/bench/peer_llmcompressor.py --model DIR \
        --calibration-tokens calib.pt --scheme w4a16-g64 --out OUT

Schemes:
  w4a16-g64             GPTQ, INT4 symmetric weights, group 64
  w4a16-asym-g64        GPTQ, INT4 asymmetric weights, group 64
  w8a8-smoothquant-gptq SmoothQuant(0.8) then GPTQ W8A8 (int8 per-channel weights; int8 dynamic per-token
                        activations, which are NOT baked into the saved model: result.json describes them so the
                        caller can simulate them)

Writes OUT/model/ (plain fp32 HF folder whose Linear weights are llm-compressor's quantized values, dequantized,
plus the tokenizer files) and OUT/result.json (timings, peak RSS, a check that every weight lies on its grid).
"""
import argparse
import json
import os
import resource
import shutil
import sys
import time

SCHEMES = ("w4a16-g64", "w4a16-asym-g64", "w8a8-smoothquant-gptq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
ACT_INT8_PER_TOKEN = {"format": "int8", "granularity": "per_token", "dynamic": True, "symmetric": True}


def build_recipe(scheme):
    """The llm-compressor modifiers for one scheme (explicit config_groups: presets use group 128)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    if scheme == "w8a8-smoothquant-gptq":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])], ACT_INT8_PER_TOKEN
    weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64,
                               symmetric=(scheme == "w4a16-g64"), dynamic=False)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    return [GPTQModifier(config_groups=groups, ignore=["lm_head"])], None


def dequantize_and_check(model):
    """Return ({param name: dequantized fp32 weight}, grid report) for every weight-quantized module.

    For each module: q = W / scale + zero_point (per group / channel) must be near-integer and inside
    [qmin, qmax]; the saved weight is (round(q) clamped - zero_point) * scale, the value compressed-tensors'
    dequantizer gives."""
    import torch
    from compressed_tensors.quantization.utils import calculate_range

    weights, worst_dist, worst_requant, n_modules, ranges = {}, 0.0, 0.0, 0, set()
    for name, module in model.named_modules():
        qs = getattr(module, "quantization_scheme", None)
        if qs is None or qs.weights is None:
            continue
        args = qs.weights
        w = module.weight.detach().to(torch.float64)
        scale = module.weight_scale.detach().to(torch.float64)
        zp = getattr(module, "weight_zero_point", None)
        zp = torch.zeros_like(scale) if zp is None else zp.detach().to(torch.float64)
        # Expand per-group / per-channel params to one value per weight column.
        if scale.shape[1] == 1:
            s_full, z_full = scale.expand_as(w), zp.expand_as(w)
        else:
            g_idx = getattr(module, "weight_g_idx", None)
            if g_idx is None or (g_idx < 0).any():  # contiguous groups
                g_idx = torch.arange(w.shape[1]) // args.group_size
            s_full, z_full = scale[:, g_idx.long()], zp[:, g_idx.long()]
        qmin, qmax = (float(v) for v in calculate_range(args, "cpu"))
        q = w / s_full + z_full
        q_int = torch.clamp(torch.round(q), qmin, qmax)
        dist = float((q - q_int).abs().max())
        deq = (q_int - z_full) * s_full
        worst_dist = max(worst_dist, dist)
        worst_requant = max(worst_requant, float((deq - w).abs().max()))
        ranges.add((qmin, qmax))
        weights[f"{name}.weight"] = deq.to(torch.float32)
        n_modules += 1
    report = {"modules": n_modules, "max_dist_to_grid": worst_dist,
              "max_abs_weight_change_on_requant": worst_requant,
              "q_ranges": sorted(list(r) for r in ranges), "ok": n_modules > 0 and worst_dist < 1e-3}
    return weights, report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model folder (fp32 safetensors)")
    ap.add_argument("--calibration-tokens", required=True, help="torch.save'd int64 tensor (N, L) of token ids")
    ap.add_argument("--scheme", required=True, choices=SCHEMES)
    ap.add_argument("--out", required=True, help="output folder (gets model/ and result.json)")
    a = ap.parse_args()
    t_total = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import compressed_tensors
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from loguru import logger
    from transformers import AutoModelForCausalLM

    # llm-compressor logs through loguru; keep its warnings (e.g. GPTQ falling back to round-to-nearest
    # when a Hessian inversion fails, which it only logs) for result.json.
    llmc_warnings = []
    logger.add(lambda m: llmc_warnings.append(m.record["message"]), level="WARNING",
               filter=lambda r: r["level"].name in ("WARNING", "ERROR", "CRITICAL"))  # not its METRIC level

    tokens = torch.load(a.calibration_tokens, weights_only=True)
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        sys.exit(f"--calibration-tokens: want an int64 (N, L) tensor, got {tokens.dtype} {tuple(tokens.shape)}")
    n, seq_len = tokens.shape
    calib = Dataset.from_dict({"input_ids": tokens.tolist(),
                               "attention_mask": torch.ones_like(tokens).tolist()})

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    recipe, act_quant = build_recipe(a.scheme)

    # Exactly the given rows, in order, each once: no shuffling, no truncation below L, batch size 1.
    t0 = time.perf_counter()
    model = oneshot(model=model, tokenizer=a.model, dataset=calib, recipe=recipe,
                    num_calibration_samples=n, max_seq_length=seq_len,
                    shuffle_calibration_samples=False, batch_size=1)
    oneshot_s = time.perf_counter() - t0

    # Copy every parameter (SmoothQuant also rescales the RMSNorm weights) into a fresh plain model,
    # replacing quantized Linear weights with their dequantized grid values.
    deq, grid = dequantize_and_check(model)
    qstate = model.state_dict()
    plain = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(deq[name] if name in deq else qstate[name])
    model_dir = os.path.join(a.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    plain.save_pretrained(model_dir)
    for f in TOKENIZER_FILES:
        src = os.path.join(a.model, f)
        if os.path.exists(src) and not os.path.exists(os.path.join(model_dir, f)):
            shutil.copy(src, model_dir)

    result = {
        "tool": "llmcompressor",
        "version": llmcompressor.__version__,
        "compressed_tensors_version": compressed_tensors.__version__,
        "torch_version": torch.__version__,
        "scheme": a.scheme,
        "wall_s": {"oneshot": round(oneshot_s, 3), "total": round(time.perf_counter() - t_total, 3)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "num_samples": n,
        "seq_len": seq_len,
        "activation_quant": act_quant,
        "grid_check": grid,
        "gptq_rtn_fallback": any("Hessian inversion failed" in w for w in llmc_warnings),
        "llmcompressor_warnings": sorted(set(w for w in llmc_warnings if "No accelerator" not in w)),
        "calibration_pipeline": "independent (llm-compressor default): SequentialPipeline per modifier",
    }
    with open(os.path.join(a.out, "result.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result))
    if not grid["ok"]:
        sys.exit("grid check failed: weights are not on the quantization grid")


if __name__ == "__main__":
    main()
