"""Quantize-dequantize ("fake quant") of activations and the FP4 (E2M1) grid: the numbers a W8A8 / W4A8 /
NVFP4 kernel computes with, written as plain torch ops so evaluation, checkpoints and ONNX agree.

Activation formats:
  int8  symmetric scale s = amax / 127, codes clamped to [-128, 127]: x_q = clamp(round(x / s), -128, 127) * s
        (the saturation of ONNX QuantizeLinear, TensorRT and compressed-tensors, so a value below the
        calibrated range rounds the same everywhere; dynamic per-token scales never reach -128)
  fp8   E4M3, x_q = fp8(x / s) * s with s = amax / 448
  nvfp4 groups of 16 along the last dim, FP4 E2M1 values with an FP8 E4M3 scale per group and one float32
        global scale (per tensor), as NVIDIA's NVFP4.
Scales are per tensor (static: calibrated, passed in) or per token (dynamic: amax of each row at run time).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_EPS = 1e-12


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (saturating at +-6). Ties go to the even code, as hardware."""
    a = x.abs().clamp(max=FP4_MAX)
    # Piecewise-uniform grid: step 0.5 below 2, 1 in [2, 4), 2 in [4, 6].
    step = torch.where(a < 2.0, torch.full_like(a, 0.5), torch.where(a < 4.0, torch.ones_like(a), torch.full_like(a, 2.0)))
    q = torch.round(a / step) * step
    return torch.sign(x) * q.clamp(max=FP4_MAX)


def fp4_codes(v: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 values (already on the grid) -> 4-bit codes (sign bit 3, magnitude index 0..7) as uint8."""
    mag = torch.bucketize(v.abs(), FP4_GRID.to(v.device))  # exact grid values map to their index
    return (mag + torch.where(v < 0, 8, 0)).to(torch.uint8)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `fp4_codes`, as float32 (written with arithmetic so that it exports to plain ONNX ops)."""
    c = codes.to(torch.float32)
    sign = torch.floor(c / 8.0)
    m = c - 8.0 * sign
    # Magnitudes 0,.5,1,1.5 for m<4 (m/2); 2,3,4,6 for m>=4: 2 * 2^((m-4)//2) * (1 + ((m-4)%2)/2)
    e = torch.floor((m - 4.0) / 2.0)
    hi = torch.pow(2.0, e + 1.0) * (1.0 + (m - 4.0 - 2.0 * e) / 2.0)
    mag = torch.where(m < 4.0, m / 2.0, hi)
    return mag * (1.0 - 2.0 * sign)


def nvfp4_scales(g: torch.Tensor, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group FP8 scales for g (..., G, 16) and the float32 global scale: group scale = fp8(amax/6 / global),
    global = amax(tensor) / (6 * 448), so the FP8 scales use their full range."""
    amax_g = g.abs().amax(dim=-1, keepdim=True)
    if global_scale is None:
        global_scale = (g.abs().amax() / (FP4_MAX * FP8_MAX)).clamp_min(_EPS)
    s = (amax_g / FP4_MAX / global_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    return s, global_scale.to(torch.float32)


def fake_quant_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """Dynamic NVFP4 quantize-dequantize along the last dim (which must be a multiple of 16)."""
    shape = x.shape
    g = x.to(torch.float32).reshape(*shape[:-1], shape[-1] // 16, 16)
    s8, gs = nvfp4_scales(g)
    s = s8.to(torch.float32) * gs
    q = round_fp4(g / torch.where(s == 0, torch.ones_like(s), s)) * s
    return q.reshape(shape).to(x.dtype)


def activation_scale(x: torch.Tensor, fmt: str, per_token: bool) -> torch.Tensor:
    qmax = 127.0 if fmt == "int8" else FP8_MAX
    a = x.detach().abs().amax(dim=-1, keepdim=True) if per_token else x.detach().abs().amax()
    return a.to(torch.float32).clamp_min(_EPS) / qmax


def fake_quant(x: torch.Tensor, fmt: str, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize x with the given scale (a scalar or one per row), in x's dtype."""
    xf = x.to(torch.float32)
    if fmt == "int8":
        q = torch.clamp(torch.round(xf / scale), -128.0, 127.0) * scale
    elif fmt == "fp8":
        q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale
    else:
        raise ValueError(f"unknown activation format {fmt!r}")
    return q.to(x.dtype)


def fake_quant_activation(x: torch.Tensor, fmt: str, dynamic: bool, scale: torch.Tensor | None) -> torch.Tensor:
    if fmt == "nvfp4":
        return fake_quant_nvfp4(x)
    if dynamic:
        scale = activation_scale(x, fmt, per_token=True)
    return fake_quant(x, fmt, scale)
