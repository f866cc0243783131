"""quantize_rtn: round-to-nearest weight quantization (INT8, INT4, FP8 E4M3, NVFP4), optionally with
quantized activations (W8A8 INT8/FP8, W4A8, NVFP4 W4A4). No calibration needed unless activation scales are
static.

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

FP8 W8A8 with dynamic per-token activations (Hopper):

      - pass: quantize_rtn
        format: fp8
        activations: {format: fp8, dynamic: true}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import PassError
from compressor.passes.quantize._activations import ActivationConfig, calibrate_static, needs_static_calibration
from compressor.registry import Artifact, PassResult, register_pass
from compressor.targets import Format

_FORMATS = {"int8": Format.INT8, "int4": Format.INT4_WEIGHT_ONLY, "fp8": Format.FP8, "nvfp4": Format.NVFP4}
_BITS = {"int8": 8, "int4": 4, "fp8": 8, "nvfp4": 4.5}  # nvfp4: 4 bits + an fp8 scale per 16


class RTNConfig(BaseModel):
    """Round-to-nearest weight quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["int8", "int4", "fp8", "nvfp4"]
    granularity: Literal["per_channel", "per_group", "per_tensor", "per_block"] = "per_channel"
    group_size: int | None = Field(None, description="input columns per scale; with granularity per_group")
    block_size: int = Field(128, gt=0, description="fp8 with granularity per_block: B x B weight blocks")
    symmetric: bool = True
    observer: Literal["minmax", "mse"] = Field("minmax", description="int weights: scale from the min/max, or "
                                               "from the MSE-optimal clipping range")
    activations: ActivationConfig | None = Field(None, description="quantize layer inputs too (W8A8, W4A8)")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="fnmatch patterns of layer names to keep")
    ragged: Literal["error", "skip"] = Field(
        "error", description="a layer whose width the group size does not divide: error (default), or skip: "
                             "keep that layer unquantized and list it in the report")

    @model_validator(mode="after")
    def _check(self) -> "RTNConfig":
        if self.format == "nvfp4":
            if self.granularity not in ("per_channel", "per_group") or self.group_size not in (None, 16):
                raise ValueError("nvfp4 has a fixed layout: groups of 16 (leave granularity and group_size unset)")
            if not self.symmetric:
                raise ValueError("nvfp4 is symmetric (no zero point)")
            return self
        if self.granularity == "per_group":
            if self.group_size is None:
                raise ValueError("granularity per_group needs group_size (e.g. 32, 64 or 128)")
            if self.group_size < 2 or self.group_size % 2:
                raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity per_group (granularity is {self.granularity})")
        if self.granularity == "per_block" and self.format != "fp8":
            raise ValueError("granularity per_block (B x B weight blocks) is for fp8 weights")
        if self.format == "fp8":
            if self.granularity == "per_group":
                raise ValueError("fp8 weights take per_channel, per_tensor or per_block scales")
            if not self.symmetric:
                raise ValueError("fp8 is symmetric (no zero point)")
            if self.observer != "minmax":
                raise ValueError("observer mse is for integer weights; fp8 scales come from the max")
        return self

    @property
    def group(self) -> int:
        """QuantLinear's encoding: > 0 per-group, 0 per-channel, -1 per-tensor."""
        if self.format == "nvfp4":
            return 16
        return {"per_channel": 0, "per_tensor": -1, "per_block": 0}.get(self.granularity, self.group_size or 0)

    @property
    def block(self) -> int:
        return self.block_size if self.granularity == "per_block" else 0

    @property
    def bits_per_weight(self) -> float:
        return _BITS[self.format]


def _output_bytes(cfg: RTNConfig, tensors: list) -> list:
    from compressor.passes.quantize._layers import estimate_tensors

    return estimate_tensors(tensors, cfg.bits_per_weight, cfg.group, cfg.symmetric, cfg.ignore)


def _formats(cfg: RTNConfig) -> set:
    return {_FORMATS[cfg.format]} | ({cfg.activations.target_format} if cfg.activations else set())


@register_pass("quantize_rtn", config=RTNConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=needs_static_calibration, formats=_formats, memory_factor=1.3,
               output_bytes=_output_bytes)
def run(handle, cfg: RTNConfig, ctx) -> PassResult:
    import torch

    from compressor.passes.quantize import _rtn_math as m
    from compressor.passes.quantize._layers import install_quantized, prepare, select_layers, split_ragged

    prepare(handle.model, ctx.logger)
    layers = select_layers(handle.model, cfg.ignore)
    if not layers:
        raise PassError("quantize_rtn", [], f"no Linear layers left to quantize after ignore={cfg.ignore}", exit_code=2)
    group = cfg.group if cfg.group > 0 else None
    layers, skipped = split_ragged("quantize_rtn", layers, group, cfg.ragged)
    if cfg.format in ("int4", "nvfp4") and any(mod.in_features % 2 for _, mod in layers):
        raise PassError("quantize_rtn", [], f"{cfg.format} packing needs even input widths", exit_code=2)
    act = cfg.activations.scheme if cfg.activations else None

    sqnr = {}
    with torch.no_grad():
        for name, lin in ctx.progress(layers, desc=f"quantize_rtn {cfg.format}", unit="layer"):
            w = lin.weight.detach()
            if cfg.format == "fp8":
                q = m.quantize_fp8(w, cfg.group, cfg.block)
            elif cfg.format == "nvfp4":
                q = m.quantize_nvfp4(w)
            else:
                q = m.quantize_int(w, int(_BITS[cfg.format]), cfg.group, cfg.symmetric, cfg.observer)
            ql = install_quantized(handle.model, name, lin, q, cfg.format, cfg.group, cfg.symmetric, cfg.block, act)
            deq = ql.dequantized_weight()
            if not torch.isfinite(deq).all():
                raise PassError("quantize_rtn", [], f"layer {name}: dequantized weight has NaN/Inf")
            sqnr[name] = round(m.sqnr_db(w, deq), 3)
    vals = sorted(sqnr.values())
    info = {"layers_quantized": len(sqnr), "layers_skipped_ragged": skipped,
            "sqnr_db_min": vals[0], "sqnr_db_median": vals[len(vals) // 2],
            "worst_layer": min(sqnr, key=sqnr.get), "sqnr_db": sqnr}
    if skipped:
        ctx.logger.warning("quantize_rtn: %d layers kept unquantized (ragged groups): %s", len(skipped), skipped)
    ctx.logger.info("quantize_rtn: %d layers, weight SQNR median %.1f dB (min %.1f dB at %s)",
                    len(sqnr), info["sqnr_db_median"], info["sqnr_db_min"], info["worst_layer"])
    info.update(calibrate_static("quantize_rtn", handle, cfg.activations, ctx))
    return PassResult(info=info)
