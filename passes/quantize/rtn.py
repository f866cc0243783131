"""quantize_rtn: weight-only round-to-nearest quantization (INT8, INT4, FP8 E4M3). No calibration needed.

Keeps real packed weights + scales (+ zero points) in QuantLinear modules, so checkpoints and ONNX graphs ship
exactly the numbers that evaluation measured.

Example (INT4, groups of 64 input columns, symmetric; SmolLM2's widths 576 and 1536 are multiples of 64):

    passes:
      - pass: quantize_rtn
        format: int4
        granularity: per_group
        group_size: 64
        symmetric: true
        ignore: ["lm_head"]
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass
from compressor.targets import Format

_FORMATS = {"int8": Format.INT8, "int4": Format.INT4_WEIGHT_ONLY, "fp8": Format.FP8}
_BITS = {"int8": 8, "int4": 4, "fp8": 8}


class RTNConfig(BaseModel):
    """Round-to-nearest weight quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["int8", "int4", "fp8"]
    granularity: Literal["per_channel", "per_group", "per_tensor"] = "per_channel"
    group_size: int | None = Field(None, description="input columns per scale; with granularity per_group")
    symmetric: bool = True
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="fnmatch patterns of layer names to keep")
    ragged: Literal["error", "skip"] = Field(
        "error", description="a layer whose width the group size does not divide: error (default), or skip: "
                             "keep that layer unquantized and list it in the report")

    @model_validator(mode="after")
    def _check(self) -> "RTNConfig":
        if self.granularity == "per_group":
            if self.group_size is None:
                raise ValueError("granularity per_group needs group_size (e.g. 32, 64 or 128)")
            if self.group_size < 2 or self.group_size % 2:
                raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity per_group (granularity is {self.granularity})")
        if self.format == "fp8":
            if self.granularity == "per_group":
                raise ValueError("fp8 weights take per_channel or per_tensor scales")
            if not self.symmetric:
                raise ValueError("fp8 is symmetric (no zero point)")
        return self

    @property
    def group(self) -> int:
        """QuantLinear's encoding: > 0 per-group, 0 per-channel, -1 per-tensor."""
        return {"per_channel": 0, "per_tensor": -1}.get(self.granularity, self.group_size or 0)

    @property
    def bits_per_weight(self) -> float:
        return _BITS[self.format]


def _output_bytes(cfg: RTNConfig, tensors: list) -> list:
    from compressor.passes.quantize._layers import estimate_tensors

    return estimate_tensors(tensors, cfg.bits_per_weight, cfg.group, cfg.symmetric, cfg.ignore)


@register_pass("quantize_rtn", config=RTNConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               formats=lambda c: {_FORMATS[c.format]}, memory_factor=1.3, output_bytes=_output_bytes)
def run(handle, cfg: RTNConfig, ctx) -> PassResult:
    import torch

    from compressor.passes.quantize import _rtn_math as m
    from compressor.passes.quantize._layers import install_quantized, select_layers, split_ragged

    layers = select_layers(handle.model, cfg.ignore)
    if not layers:
        raise PassError("quantize_rtn", [], f"no Linear layers left to quantize after ignore={cfg.ignore}", exit_code=2)
    group = cfg.group_size if cfg.granularity == "per_group" else None
    layers, skipped = split_ragged("quantize_rtn", layers, group, cfg.ragged)
    if cfg.format == "int4" and any(mod.in_features % 2 for _, mod in layers):
        raise PassError("quantize_rtn", [], "int4 packing needs even input widths", exit_code=2)

    sqnr = {}
    with torch.no_grad():
        for name, lin in ctx.progress(layers, desc=f"quantize_rtn {cfg.format}", unit="layer"):
            w = lin.weight.detach()
            if cfg.format == "fp8":
                q = m.quantize_fp8(w, cfg.group)
            else:
                q = m.quantize_int(w, _BITS[cfg.format], cfg.group, cfg.symmetric)
            ql = install_quantized(handle.model, name, lin, q, cfg.format, cfg.group, cfg.symmetric)
            deq = ql.dequantized_weight()
            if not torch.isfinite(deq).all():
                raise PassError("quantize_rtn", [], f"layer {name}: dequantized weight has NaN/Inf")
            sqnr[name] = round(m.sqnr_db(w, deq), 3)
    vals = sorted(sqnr.values())
    info = {"layers_quantized": len(sqnr), "layers_skipped_ragged": skipped,
            "sqnr_db_min": vals[0], "sqnr_db_median": vals[len(vals) // 2],
            "worst_layer": min(sqnr, key=sqnr.get)}
    if skipped:
        ctx.logger.warning("quantize_rtn: %d layers kept unquantized (ragged groups): %s", len(skipped), skipped)
    ctx.logger.info("quantize_rtn: %d layers, weight SQNR median %.1f dB (min %.1f dB at %s)",
                    len(sqnr), info["sqnr_db_median"], info["sqnr_db_min"], info["worst_layer"])
    return PassResult(info=info)
