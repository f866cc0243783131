"""Hardware target profiles (facts from datasheets, see docs in TARGETS.md) and format legality.

Peaks are dense (no 2:4 sparsity). Bandwidth in bytes/s, peaks in FLOP/s (OP/s for INT8).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from enum import StrEnum

from compressor.errors import TargetError


class Format(StrEnum):
    """Numeric formats a pass can produce. Each needs hardware support on the target to run natively."""

    FP32 = "fp32"
    """IEEE float32; everywhere."""
    BF16 = "bf16"
    """bfloat16 weights and activations."""
    INT8 = "int8"
    """8-bit integer weights (weight-only or W8A8)."""
    INT4_WEIGHT_ONLY = "int4_weight_only"
    """4-bit integer weights, dequantized to 16-bit before the GEMM (W4A16)."""
    FP8 = "fp8"
    """FP8 E4M3: needs FP8 tensor cores, compute capability 8.9 or newer."""
    NVFP4 = "nvfp4"
    """Group-16 FP4 with FP8 scales: Blackwell (compute capability 10.0) only."""


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    peak_flops: dict[str, float]  # precision -> FLOP/s (dense)
    compute_capability: tuple[int, int] | None  # None for CPU
    formats: frozenset[Format] = field(default_factory=frozenset)
    usd_per_hour: float | None = None  # default on-demand price, see PRICE_DATE
    is_gpu: bool = True

    def supports(self, fmt: Format) -> bool:
        return fmt in self.formats

    def why_not(self, fmt: Format) -> str:
        """A one-line reason why `fmt` is illegal here, with the formats that are legal."""
        cc = self.compute_capability
        if fmt is Format.FP8 and cc is not None and cc < (8, 9):
            reason = f"no FP8 units before compute capability 8.9 ({self.name} is {cc[0]}.{cc[1]})"
        elif fmt is Format.NVFP4 and cc is not None and cc < (10, 0):
            reason = f"NVFP4 needs compute capability 10.0 (Blackwell); {self.name} is {cc[0]}.{cc[1]}"
        else:
            reason = f"{self.name} has no native support for {fmt.value}"
        legal = ", ".join(sorted(f.value for f in self.formats))
        return f"{fmt.value} is not supported on target {self.name}: {reason}; supported formats: {legal}"


PRICE_DATE = "2026-11 (on-demand, mid-range of public offers)"

_HOPPER = frozenset({Format.FP32, Format.BF16, Format.INT8, Format.INT4_WEIGHT_ONLY, Format.FP8})
_ADA = _HOPPER
_AMPERE = frozenset({Format.FP32, Format.BF16, Format.INT8, Format.INT4_WEIGHT_ONLY})
_BLACKWELL = _HOPPER | {Format.NVFP4}
TB, T = 1e12, 1e12

TARGETS: dict[str, TargetSpec] = {
    t.name: t
    for t in [
        TargetSpec("h200", "NVIDIA H200 SXM, 141 GB HBM3e", 141e9, 4.8 * TB,
                   {"bf16": 989 * T, "fp8": 1979 * T, "int8": 1979 * T}, (9, 0), _HOPPER, 4.1),
        TargetSpec("h100", "NVIDIA H100 SXM, 80 GB HBM3", 80e9, 3.35 * TB,
                   {"bf16": 989 * T, "fp8": 1979 * T, "int8": 1979 * T}, (9, 0), _HOPPER, 3.5),
        TargetSpec("a100", "NVIDIA A100 80 GB", 80e9, 2.04 * TB,
                   {"bf16": 312 * T, "int8": 624 * T}, (8, 0), _AMPERE, 2.4),
        TargetSpec("l40s", "NVIDIA L40S, 48 GB GDDR6", 48e9, 0.864 * TB,
                   {"bf16": 362 * T, "fp8": 733 * T, "int8": 733 * T}, (8, 9), _ADA, 1.2),
        TargetSpec("l4", "NVIDIA L4, 24 GB GDDR6", 24e9, 0.30 * TB,
                   {"bf16": 121 * T, "fp8": 242 * T, "int8": 242 * T}, (8, 9), _ADA, 0.75),
        TargetSpec("b200", "NVIDIA B200, 180 GB HBM3e", 180e9, 7.7 * TB,
                   {"bf16": 2250 * T, "fp8": 4500 * T, "int8": 4500 * T, "fp4": 9000 * T}, (10, 0), _BLACKWELL, 6.5),
        # The CPU target runs every format through dequantization (ONNX Runtime / torch); nothing is refused,
        # and no cost is modeled: CPU figures are measured.
        TargetSpec("cpu", "x86-64/aarch64 CPU (ONNX Runtime, torch)", 0.0, 0.0, {}, None,
                   frozenset(Format) - {Format.NVFP4}, None, is_gpu=False),
    ]
}


def get_target(name: str) -> TargetSpec:
    try:
        return TARGETS[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), TARGETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TargetError(f"unknown target {name!r}{hint} (known: {', '.join(TARGETS)})") from None
