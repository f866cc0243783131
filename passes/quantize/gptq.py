"""quantize_gptq: INT4/INT8 weight-only quantization with GPTQ (Hessian-based error compensation).

Layer-sequential: the inputs of decoder block i are captured once, each Linear's Hessian H = 2 X^T X is
accumulated from them, the block's Linears are quantized, and the block's outputs computed with the quantized
weights feed block i+1. Peak memory is one block plus the cached activations.

A Hessian that is not positive definite does not crash the run or corrupt a layer: dampening is raised 10x and
retried (up to max_damp_retries); every retry is logged and listed in the report.

Example (SmolLM2: widths 576 and 1536, so group 64):

    calibration: {source: "asset:python-docs", num_samples: 32, seq_len: 512}
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

from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass
from compressor.targets import Format

_FORMATS = {"int8": Format.INT8, "int4": Format.INT4_WEIGHT_ONLY}
_BITS = {"int8": 8, "int4": 4}


class GPTQConfig(BaseModel):
    """GPTQ weight quantization (Frantar et al., 2022)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["int4", "int8"] = "int4"
    group_size: int = Field(128, ge=0, description="input columns per scale; 0 = one scale per output channel")
    symmetric: bool = True
    dampening_frac: float = Field(0.01, ge=0, description="added to H's diagonal, as a fraction of its mean")
    act_order: bool = Field(False, description="visit columns by decreasing Hessian diagonal (static groups)")
    block_size: int = Field(128, gt=0, description="columns updated together (lazy batch updates)")
    max_damp_retries: int = Field(5, ge=0, description="times dampening is raised 10x if H is not positive definite")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="fnmatch patterns of layer names")
    ragged: Literal["error", "skip"] = "error"


def _output_bytes(cfg: GPTQConfig, tensors: list) -> list:
    from compressor.passes.quantize._layers import estimate_tensors

    return estimate_tensors(tensors, _BITS[cfg.format], cfg.group_size, cfg.symmetric, cfg.ignore)


@register_pass("quantize_gptq", config=GPTQConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=True, formats=lambda c: {_FORMATS[c.format]}, memory_factor=1.5,
               output_bytes=_output_bytes)
def run(handle, cfg: GPTQConfig, ctx) -> PassResult:
    import torch

    from compressor.calibration.forward_loop import decoder_blocks, layer_sequential
    from compressor.passes.quantize import _rtn_math as m
    from compressor.passes.quantize._gptq_math import HessianNotPositiveDefinite, accumulate_hessian, gptq_quantize
    from compressor.passes.quantize._layers import install_quantized, select_layers, split_ragged

    if ctx.calibration is None:
        raise PassError("quantize_gptq", [], "needs calibration data (a `calibration:` section)", exit_code=2)
    batches = ctx.calibration()
    model = handle.model
    blocks = decoder_blocks(model)
    prefix = next(n for n, mod in model.named_modules() if mod is blocks)
    all_layers = [(f"{prefix}.{i}", select_layers(b, cfg.ignore, prefix=f"{prefix}.{i}")) for i, b in enumerate(blocks)]
    flat, skipped = split_ragged("quantize_gptq", [x for _, ls in all_layers for x in ls], cfg.group_size, cfg.ragged)
    keep = {n for n, _ in flat}
    bits = _BITS[cfg.format]
    stats: dict[str, dict] = {}

    def work(i: int, block, run_block) -> None:
        layers = [(n, lin) for n, lin in all_layers[i][1] if n in keep]
        hess: dict[str, list] = {n: [None, 0] for n, _ in layers}

        def hook_for(name):
            def hook(mod, args):
                hess[name][0], hess[name][1] = accumulate_hessian(hess[name][0], hess[name][1], args[0])
            return hook

        handles = [lin.register_forward_pre_hook(hook_for(n)) for n, lin in layers]
        try:
            run_block()
        finally:
            for h in handles:
                h.remove()
        for name, lin in layers:
            h, n_tok = hess[name]
            try:
                r = gptq_quantize(lin.weight.data, h, bits, cfg.group_size, cfg.symmetric, cfg.dampening_frac,
                                  cfg.block_size, cfg.act_order, cfg.max_damp_retries)
            except HessianNotPositiveDefinite as e:
                raise PassError("quantize_gptq", [], f"{name}: Hessian not positive definite after "
                                f"{cfg.max_damp_retries} retries ({e}); raise dampening_frac (now "
                                f"{cfg.dampening_frac}) or give more calibration data") from None
            ql = install_quantized(model, name, lin, r.quantized, cfg.format, cfg.group_size, cfg.symmetric)
            deq = ql.dequantized_weight()
            if not torch.isfinite(deq).all():
                raise PassError("quantize_gptq", [], f"{name}: dequantized weight has NaN/Inf")
            stats[name] = {"sqnr_db": round(m.sqnr_db(lin.weight.data, deq), 3), "loss": r.loss,
                           "tokens": n_tok, "dampening": r.dampening, "retries": r.retries}
            if r.retries:
                ctx.logger.warning("quantize_gptq: %s: Hessian not positive definite at dampening %g; "
                                   "succeeded at %g after %d retries", name, cfg.dampening_frac, r.dampening, r.retries)

    ctx.logger.info("quantize_gptq: %d calibration samples x %d tokens, %d blocks", *batches.shape, len(blocks))
    layer_sequential(model, batches, work, ctx.progress)
    vals = sorted(s["sqnr_db"] for s in stats.values())
    retried = {n: {"dampening": s["dampening"], "retries": s["retries"]} for n, s in stats.items() if s["retries"]}
    info = {"layers_quantized": len(stats), "layers_skipped_ragged": skipped, "sqnr_db_min": vals[0],
            "sqnr_db_median": vals[len(vals) // 2], "calibration_tokens": int(batches.numel()),
            "dampening_retries": retried}
    ctx.logger.info("quantize_gptq: %d layers, weight SQNR median %.1f dB; %d layers needed more dampening",
                    len(stats), info["sqnr_db_median"], len(retried))
    return PassResult(info=info)
