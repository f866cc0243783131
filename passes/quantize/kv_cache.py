"""kv_cache_fp8: store the KV cache in FP8 E4M3 with calibrated static scales, per layer or per KV head.

Halves the KV cache's bytes (the memory that bounds batch size at long context). The scales come from the
largest |key| / |value| seen on the calibration set (after RoPE, as the cache holds them), divided by 448;
`margin` > 1 leaves headroom for values larger than calibration saw. Evaluation runs attention on the
quantized keys and values; checkpoints carry `self_attn.k_scale` / `v_scale`.

    passes:
      - pass: kv_cache_fp8
        per_head: false
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass
from compressor.targets import Format


class KVCacheConfig(BaseModel):
    """FP8 KV cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_head: bool = Field(False, description="one scale per KV head (else one per layer)")
    margin: float = Field(1.0, ge=1.0, le=4.0, description="scales = margin x calibrated amax / 448")


@register_pass("kv_cache_fp8", config=KVCacheConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=True, formats=lambda c: {Format.FP8}, memory_factor=1.3)
def run(handle, cfg: KVCacheConfig, ctx) -> PassResult:
    import torch

    from compressor.calibration.stats import run_batches
    from compressor.kernels import kv_quant

    if ctx.calibration is None:
        raise PassError("kv_cache_fp8", [], "needs calibration data (a `calibration:` section)", exit_code=2)
    model = handle.model
    try:
        mods = kv_quant.install(model, cfg.per_head)
    except TypeError as e:
        raise PassError("kv_cache_fp8", [], str(e), exit_code=2) from None
    seen: dict[str, list] = {n: [None, None] for n, _ in mods}

    def observer(name):
        def obs(key, value):
            for i, t in enumerate((key, value)):
                if not torch.isfinite(t).all():
                    raise PassError("kv_cache_fp8", [], f"{name}: {'keys' if i == 0 else 'values'} turned NaN/Inf "
                                    "during calibration")
                a = kv_quant.amax(t, cfg.per_head)
                seen[name][i] = a if seen[name][i] is None else torch.maximum(seen[name][i], a)
        return obs

    for n, m in mods:
        m._kv_observe = observer(n)
    try:
        run_batches(model, ctx.calibration(), ctx.progress, "kv cache scales")
    finally:
        for _, m in mods:
            del m._kv_observe
    with torch.no_grad():
        for n, m in mods:
            k, v = seen[n]
            if k is None:
                raise PassError("kv_cache_fp8", [], f"{n} saw no calibration tokens")
            m.k_scale.copy_(kv_quant.scales_from_amax(k * cfg.margin))
            m.v_scale.copy_(kv_quant.scales_from_amax(v * cfg.margin))
    ks = [float(m.k_scale.max()) for _, m in mods]
    vs = [float(m.v_scale.max()) for _, m in mods]
    ctx.logger.info("kv_cache_fp8: %d layers, key scales %.3g..%.3g, value scales %.3g..%.3g",
                    len(mods), min(ks), max(ks), min(vs), max(vs))
    return PassResult(info={"layers": len(mods), "per_head": cfg.per_head,
                            "k_amax_max": max(ks) * 448, "v_amax_max": max(vs) * 448})
