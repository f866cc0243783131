"""quantize_gptq: INT4/INT8/FP8 weight quantization with GPTQ (Hessian-based error compensation), optionally
with quantized activations (`activations:`, e.g. W8A8 after smoothquant, or FP8 W8A8).

Layer-sequential: the inputs of decoder block i are captured once, each Linear's Hessian H = 2 X^T X is
accumulated from them, the block's Linears are quantized, and the block's outputs computed with the quantized
weights feed block i+1. Peak memory is one block plus the cached activations.

A Hessian that is not positive definite does not crash the run or corrupt a layer: dampening is raised 10x and
retried (up to max_damp_retries); every retry is logged and listed in the report.

Example (SmolLM2: widths 576 and 1536, so group 64):

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 128, seq_len: 512}
    passes:
      - pass: quantize_gptq
        format: int4
        group_size: 64
        symmetric: true
        dampening_frac: 0.01
        act_order: false
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compressor.errors import PassError
from compressor.passes.quantize._activations import calibrate_static
from compressor.passes.quantize._config import IntWeightConfig, formats, output_bytes
from compressor.registry import Artifact, PassResult, register_pass


class GPTQConfig(IntWeightConfig):
    """GPTQ weight quantization (Frantar et al., 2022)."""

    format: Literal["int4", "int8", "fp8"] = Field("int4", description="fp8: E4M3 grid, per-channel scales")

    dampening_frac: float = Field(0.01, ge=0, description="added to H's diagonal, as a fraction of its mean")
    act_order: bool = Field(False, description="visit columns by decreasing Hessian diagonal (static groups)")
    block_size: int = Field(128, gt=0, description="columns updated together (lazy batch updates)")
    max_damp_retries: int = Field(5, ge=0, description="times dampening is raised 10x if H is not positive definite")
    observer: Literal["minmax", "mse"] = Field("minmax", description="group ranges from min/max, or MSE-optimal "
                                               "clipping of each group")

    @model_validator(mode="after")
    def _check(self) -> "GPTQConfig":
        if self.format == "fp8" and (self.group_size != 0 or not self.symmetric or self.observer != "minmax"):
            raise ValueError("fp8 GPTQ takes per-channel scales: group_size 0, symmetric, observer minmax")
        return self


@register_pass("quantize_gptq", config=GPTQConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=True, formats=formats, memory_factor=1.5,
               output_bytes=output_bytes)
def run(handle, cfg: GPTQConfig, ctx) -> PassResult:
    import torch

    from compressor.calibration.forward_loop import decoder_blocks
    from compressor.passes.quantize import _rtn_math as m
    from compressor.moe import siblings
    from compressor.passes.quantize._gptq_math import HessianNotPositiveDefinite, gptq_quantize
    from compressor.passes.quantize._hessians import collect
    from compressor.passes.quantize._layers import install_quantized, prepare, run_blocks, select_layers, split_ragged

    if ctx.calibration is None:
        raise PassError("quantize_gptq", [], "needs calibration data (a `calibration:` section)", exit_code=2)
    prepare(handle.model, ctx.logger)
    batches = ctx.calibration()
    model = handle.model
    act = cfg.activations.scheme if cfg.activations else None
    no_tokens: dict[str, str] = {}
    blocks = decoder_blocks(model)
    prefix = next(n for n, mod in model.named_modules() if mod is blocks)
    all_layers = [(f"{prefix}.{i}", select_layers(b, cfg.ignore, prefix=f"{prefix}.{i}")) for i, b in enumerate(blocks)]
    flat, skipped = split_ragged("quantize_gptq", [x for _, ls in all_layers for x in ls], cfg.group_size, cfg.ragged)
    if not flat:
        raise PassError("quantize_gptq", [], f"no Linear layers left to quantize in the decoder blocks (ignore="
                        f"{cfg.ignore}; an already-quantized model has none)", exit_code=2)
    keep = {n for n, _ in flat}
    bits = cfg.bits
    stats: dict[str, dict] = {}
    pruned = getattr(model.config, "compressor_sparsity", None) or {}  # {layer: pattern}, set by the prune pass

    def work(i: int, block, run_block) -> None:
        layers = [(n, lin) for n, lin in all_layers[i][1] if n in keep]
        with collect(layers) as hstats:  # q/k/v and gate/up share one Hessian
            run_block()
        names = [n for n, _ in layers]
        for name, lin in layers:
            st = hstats.get(name)
            if st is None or st.n == 0:  # an MoE expert no token was routed to: borrow its siblings' Hessian
                sib = [hstats[s] for s in siblings(name, names) if s in hstats and hstats[s].n]
                if not sib:
                    raise PassError("quantize_gptq", [], f"{name} received no calibration tokens and no sibling "
                                    "expert did either; give more calibration data")
                h, n_tok = torch.stack([s.hessian for s in sib]).mean(0), 0
                no_tokens[name] = f"average Hessian of {len(sib)} sibling experts"
            else:
                h, n_tok = st.hessian, st.n
            mask = lin.weight.data != 0 if name in pruned else None  # pruned weights stay exactly zero
            try:
                r = gptq_quantize(lin.weight.data, h, bits, cfg.group_size, cfg.symmetric, cfg.dampening_frac,
                                  cfg.block_size, cfg.act_order, cfg.max_damp_retries, cfg.observer, mask)
            except HessianNotPositiveDefinite as e:
                raise PassError("quantize_gptq", [], f"{name}: Hessian not positive definite after "
                                f"{cfg.max_damp_retries} retries ({e}); raise dampening_frac (now "
                                f"{cfg.dampening_frac}) or give more calibration data") from None
            ql = install_quantized(model, name, lin, r.quantized, cfg.format, cfg.group_size, cfg.symmetric, 0, act)
            deq = ql.dequantized_weight()
            if not torch.isfinite(deq).all():
                raise PassError("quantize_gptq", [], f"{name}: dequantized weight has NaN/Inf")
            stats[name] = {"sqnr_db": round(m.sqnr_db(lin.weight.data, deq), 3), "loss": r.loss,
                           "tokens": n_tok, "dampening": r.dampening, "retries": r.retries}
            if r.retries:
                ctx.logger.warning("quantize_gptq: %s: Hessian not positive definite at dampening %g; "
                                   "succeeded at %g after %d retries", name, cfg.dampening_frac, r.dampening, r.retries)

    run_blocks("quantize_gptq", model, batches, work, ctx, no_tokens, "Hessians")
    vals = sorted(s["sqnr_db"] for s in stats.values())
    retried = {n: {"dampening": s["dampening"], "retries": s["retries"]} for n, s in stats.items() if s["retries"]}
    info = {"layers_quantized": len(stats), "layers_skipped_ragged": skipped, "sqnr_db_min": vals[0],
            "sqnr_db_median": vals[len(vals) // 2], "calibration_tokens": int(batches.numel()),
            "dampening_retries": retried, "experts_without_tokens": no_tokens,
            "sqnr_db": {n: s["sqnr_db"] for n, s in stats.items()}}
    ctx.logger.info("quantize_gptq: %d layers, weight SQNR median %.1f dB; %d layers needed more dampening",
                    len(stats), info["sqnr_db_median"], len(retried))
    info.update(calibrate_static("quantize_gptq", handle, cfg.activations, ctx))
    return PassResult(info=info)
