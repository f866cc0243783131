"""Modeled cost on a GPU target: a roofline over bytes moved and FLOPs (see TARGETS.md). Every figure here is
*modeled*, not measured, and is labeled so in reports.

Decode step time at batch B, context S:
  t = max(bytes / (bandwidth * BW_EFF), flops / (peak * FLOP_EFF))
  bytes = serving weight bytes + B * S * kv_bytes_per_token;  flops = 2 * params * B
Weight-only formats (int8/int4 weights, 16-bit activations) compute at the BF16 rate; FP8 at the FP8 rate.
2:4-sparse layers (config.compressor_sparsity, from the prune pass) are served compressed, as sparse tensor cores
store them: half the values plus a 2-bit index per kept value, and half the FLOPs. That is the paper 2x; TARGETS.md
quotes 1.3-1.6x measured end to end. Unstructured sparsity is served dense (no modeled gain).
"""

from __future__ import annotations

from compressor.targets import TargetSpec

BW_EFF = 0.6  # tuned runtimes reach ~55-60% of peak bandwidth at batch 1 (TARGETS.md)
FLOP_EFF = 0.6


def serving_weight_bytes(model) -> tuple[int, int, str]:
    """(bytes as served, parameters, compute precision). Float weights are served in BF16; packed codes,
    scales and zero points as stored."""
    from compressor.checkpoint_io import unique_state_dict
    from compressor.kernels.qlinear import QuantLinear

    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    sparse = {n for n, pat in (getattr(model.config, "compressor_sparsity", None) or {}).items() if pat == "2:4"}
    total = params = 0
    for k, t in unique_state_dict(model).items():
        owner, _, leaf = k.rpartition(".")
        q = qmods.get(owner)
        if q is not None and leaf == "weight_packed":
            nbytes, n = t.numel() * t.element_size(), q.in_features * q.out_features
        elif q is not None and leaf in ("weight_scale", "weight_zero_point"):
            total += t.numel() * t.element_size()
            continue
        else:
            nbytes, n = t.numel() * (2 if t.is_floating_point() else t.element_size()), t.numel()
        if owner in sparse and leaf in ("weight", "weight_packed"):
            nbytes, n = nbytes // 2 + n // 8, n // 2  # kept half + 2-bit indices; sparse tensor cores skip half
        total += nbytes
        params += n
    # Weight-only schemes dequantize to 16-bit before the GEMM, so they compute at the BF16 rate. When every
    # quantized layer also quantizes its activations, the GEMMs run at that precision (W8A8 INT8/FP8, W4A8 at
    # the FP8 rate, NVFP4 at the FP4 rate).
    acts = {(m.activations or {}).get("format") for m in qmods.values()}
    precision = {"int8": "int8", "fp8": "fp8", "nvfp4": "fp4"}.get(acts.pop(), "bf16") if len(acts) == 1 else "bf16"
    return total, params, precision


def kv_bytes_per_token(config, kv_bytes: int = 2) -> int:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * kv_bytes


def decode(target: TargetSpec, weight_bytes: int, params: int, kv_per_token: int, precision: str,
           batch: int, context: int, usd_per_hour: float | None = None) -> dict:
    bytes_moved = weight_bytes + batch * context * kv_per_token
    peak = target.peak_flops.get(precision) or target.peak_flops["bf16"]
    t_mem = bytes_moved / (target.bandwidth_bytes_per_s * BW_EFF)
    t_cmp = 2 * params * batch / (peak * FLOP_EFF)
    t = max(t_mem, t_cmp)
    tps = batch / t
    price = usd_per_hour if usd_per_hour is not None else target.usd_per_hour
    memory = weight_bytes + batch * context * kv_per_token
    return {"batch": batch, "context": context, "tokens_per_s": tps, "latency_ms_decode": t * 1e3,
            "bound": "memory" if t_mem >= t_cmp else "compute", "memory_gb": memory / 1e9,
            "fits": memory <= target.memory_bytes,
            "usd_per_mtok": (price / (tps * 3600) * 1e6) if price else None, "usd_per_hour": price}


def model_cost(target: TargetSpec, model, batch_sizes: list[int], context: int) -> dict:
    wb, params, precision = serving_weight_bytes(model)
    kv_fp8 = bool(getattr(model.config, "compressor_kv_cache", None))
    kv = kv_bytes_per_token(model.config, 1 if kv_fp8 else 2)
    sparse = sum(p == "2:4" for p in (getattr(model.config, "compressor_sparsity", None) or {}).values())
    return {"modeled": True, "target": target.name, "precision": precision, "weight_bytes": wb,
            "sparse_2of4_layers": sparse,
            "kv_cache": "fp8" if kv_fp8 else "bf16",
            "bandwidth_efficiency": BW_EFF, "flop_efficiency": FLOP_EFF,
            "points": [decode(target, wb, params, kv, precision, b, context) for b in batch_sizes]}
