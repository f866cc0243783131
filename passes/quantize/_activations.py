"""Activation quantization settings shared by the quantization passes (W8A8, W4A8, NVFP4 activations), and
the step that calibrates static scales once the weights are quantized.

    activations:
      format: fp8          # int8 | fp8 | nvfp4
      dynamic: true        # per-token scales computed at run time; false: one calibrated scale per tensor
      observer: minmax     # static only: minmax | percentile | mse
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import PassError
from compressor.targets import Format

_ACT_FORMATS = {"int8": Format.INT8, "fp8": Format.FP8, "nvfp4": Format.NVFP4}


class ActivationConfig(BaseModel):
    """How a quantized layer's input activations are quantized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["int8", "fp8", "nvfp4"]
    dynamic: bool = Field(True, description="per-token scales at run time (true) or a calibrated per-tensor scale")
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = Field(99.99, gt=50.0, le=100.0, description="with observer: percentile")

    @model_validator(mode="after")
    def _check(self) -> "ActivationConfig":
        if self.format == "nvfp4" and not self.dynamic:
            raise ValueError("nvfp4 activations are quantized dynamically (per group of 16); set dynamic: true")
        return self

    @property
    def scheme(self) -> dict:
        return {"format": self.format, "dynamic": self.dynamic}

    @property
    def target_format(self) -> Format:
        return _ACT_FORMATS[self.format]


def needs_static_calibration(cfg) -> bool:
    a = getattr(cfg, "activations", None)
    return a is not None and not a.dynamic


def calibrate_static(pass_name: str, handle, act: ActivationConfig | None, ctx) -> dict:
    """After a pass installed QuantLinear layers with static activation scales: observe their inputs over
    the calibration data and set the scales. Returns facts for the report."""
    from compressor.calibration.stats import NonFiniteActivation, calibrate_input_scales
    from compressor.kernels.qlinear import QuantLinear

    if act is None or act.dynamic:
        return {}
    if ctx.calibration is None:
        raise PassError(pass_name, [], "static activation scales need calibration data (a `calibration:` "
                        "section), or set activations.dynamic: true", exit_code=2)
    mods = {n: m for n, m in handle.model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    try:
        res = calibrate_input_scales(handle.model, ctx.calibration(), mods, act.observer, act.percentile,
                                     ctx.progress)
    except NonFiniteActivation as e:
        raise PassError(pass_name, [], str(e)) from None
    except ValueError as e:
        raise PassError(pass_name, [], str(e), exit_code=2) from None
    if res["no_tokens"]:
        ctx.logger.warning("%s: %d expert layers received no calibration tokens; their activation scales are "
                           "borrowed from sibling experts: %s", pass_name, len(res["no_tokens"]), res["fallback"])
    scales = sorted(float(m.input_scale) for m in mods.values())
    return {"activation_scales": len(mods), "activation_observer": act.observer,
            "activation_scale_median": scales[len(scales) // 2], "experts_without_tokens": res["fallback"]}
