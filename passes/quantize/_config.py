"""Config fields shared by the calibrated integer weight-quantization passes (GPTQ, AWQ)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.passes.quantize._activations import ActivationConfig
from compressor.targets import Format

FORMATS = {"int8": Format.INT8, "int4": Format.INT4_WEIGHT_ONLY, "fp8": Format.FP8}
BITS = {"int8": 8, "int4": 4, "fp8": "fp8"}


class IntWeightConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["int4", "int8"] = "int4"
    group_size: int = Field(128, ge=0, description="input columns per scale; 0 = one scale per output channel")
    symmetric: bool = True
    activations: ActivationConfig | None = Field(None, description="quantize layer inputs too (W8A8, W4A8)")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="fnmatch patterns of layer names")
    ragged: Literal["error", "skip"] = "error"

    @property
    def bits(self) -> int | str:
        return BITS[self.format]


def formats(cfg: IntWeightConfig) -> set:
    return {FORMATS[cfg.format]} | ({cfg.activations.target_format} if cfg.activations else set())


def output_bytes(cfg: IntWeightConfig, tensors: list) -> list:
    from compressor.passes.quantize._layers import estimate_tensors

    bits = 8 if cfg.bits == "fp8" else cfg.bits
    return estimate_tensors(tensors, bits, cfg.group_size, cfg.symmetric, cfg.ignore)
