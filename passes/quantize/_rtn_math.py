"""Round-to-nearest quantization math: pure functions on weight tensors, no modules, no I/O.

Conventions (see compressor.kernels.qlinear for the storage these feed):
- group_size > 0: groups of that many consecutive input columns; 0: one group per output row; -1: whole tensor.
- symmetric int: scale = amax / qmax, code = clamp(round(w / scale), qmin, qmax).
- asymmetric int: scale = (max - min) / (2^bits - 1), zero = round(-min / scale), code = clamp(round(w/scale) + zero).
- fp8 (E4M3): scale = amax / 448, value = fp8(w / scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_E4M3_MAX = 448.0
_EPS = 1e-12


@dataclass
class Quantized:
    codes: torch.Tensor  # (out, in): int8/uint8 codes (int4 codes unpacked, 0..15) or float8_e4m3fn values
    scale: torch.Tensor  # (out|1, groups) float32
    zero_point: torch.Tensor | None  # (out|1, groups) uint8, asymmetric only
    global_scale: torch.Tensor | None = None  # nvfp4 only: float32 (1,)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (rows, G, g) view used for per-group statistics."""
    out, inp = w.shape
    if group_size == -1:
        return w.reshape(1, 1, out * inp)
    if group_size == 0:
        return w.reshape(out, 1, inp)
    if inp % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {inp}")
    return w.reshape(out, inp // group_size, group_size)


def int_params(g: torch.Tensor, bits: int, symmetric: bool,
               ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and float zero point) for the last dimension of `g` (..., group). Shapes (..., 1).
    ratio (<= 1, scalar or (..., 1)) shrinks the range: values beyond it are clipped."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1  # 127 or 7
        return (g.abs().amax(dim=-1, keepdim=True) * ratio).clamp_min(_EPS) / qmax, None
    qmax = 2**bits - 1
    lo = g.amin(dim=-1, keepdim=True).clamp_max(0.0) * ratio  # include 0 so it is exactly representable
    hi = g.amax(dim=-1, keepdim=True).clamp_min(0.0) * ratio
    scale = ((hi - lo) / qmax).clamp_min(_EPS)
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax)


def int_codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes as float: symmetric q in [-127, 127] (int8) or [-8, 7] (int4); asymmetric in [0, 2^bits - 1]."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if bits == 8 else -(2 ** (bits - 1))
        return (g / scale).round_().clamp_(qmin, qmax)
    return (g / scale).round_().add_(zero).clamp_(0, 2**bits - 1)


def int_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (codes - zero).mul_(scale) if zero is not None else codes * scale


def to_storage(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, shape) -> "Quantized":
    """Float codes (rows, G, g) + params (rows, G, 1) -> the Quantized storage QuantLinear takes."""
    out, inp = shape
    if zero is None:
        codes = (q + 8).to(torch.uint8) if bits == 4 else q.to(torch.int8)
    else:
        codes = q.to(torch.uint8)
    return Quantized(codes.reshape(out, inp), scale.squeeze(-1),
                     None if zero is None else zero.squeeze(-1).to(torch.uint8))


def mse_clip_ratio(g: torch.Tensor, bits: int, symmetric: bool, grid: int = 20,
                   min_ratio: float = 0.5) -> torch.Tensor:
    """MSE-optimal clipping: for each group (last dim of g), the range shrink ratio in [min_ratio, 1] whose
    round-to-nearest error sum((g - q(g))^2) is smallest. Shape (..., 1)."""
    best = torch.ones_like(g[..., :1])
    best_err = torch.full_like(best, float("inf"))
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        s, z = int_params(g, bits, symmetric, r)
        err = (int_dequant(int_codes(g, s, z, bits), s, z) - g).pow(2).sum(dim=-1, keepdim=True)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, r), best)
        best_err = torch.where(better, err, best_err)
    return best


def quantize_int(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, observer: str = "minmax",
                 ratio: torch.Tensor | None = None) -> Quantized:
    """RTN integer quantization of a (out, in) weight. int4 codes are returned unsigned (0..15).
    observer: minmax (range = the group's min/max) or mse (range shrunk to minimise the squared error);
    ratio: explicit per-group range shrink (rows, G, 1), e.g. from AWQ's clipping search."""
    g = _grouped(w.detach().to(torch.float32), group_size)
    if ratio is None:
        ratio = mse_clip_ratio(g, bits, symmetric) if observer == "mse" else 1.0
    scale, zero = int_params(g, bits, symmetric, ratio)
    return to_storage(int_codes(g, scale, zero, bits), scale, zero, bits, w.shape)


def quantize_fp8(w: torch.Tensor, group_size: int, block_size: int = 0) -> Quantized:
    """FP8 E4M3 with per-channel (0), per-tensor (-1) or block_size x block_size block scales."""
    if block_size:
        return quantize_fp8_blocks(w, block_size)
    if group_size > 0:
        raise ValueError("fp8 weights take per-channel, per-tensor or block scales")
    out, inp = w.shape
    g = _grouped(w.detach().to(torch.float32), group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / FP8_E4M3_MAX
    vals = (g / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return Quantized(vals.reshape(out, inp), scale.squeeze(-1), None)


def quantize_fp8_blocks(w: torch.Tensor, b: int) -> Quantized:
    """FP8 E4M3 with one scale per b x b block (edge blocks are partial: widths need not divide by b)."""
    out, inp = w.shape
    ro, ri = math.ceil(out / b), math.ceil(inp / b)
    wp = torch.zeros(ro * b, ri * b, dtype=torch.float32)
    wp[:out, :inp] = w.detach().to(torch.float32)
    blocks = wp.reshape(ro, b, ri, b)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(_EPS) / FP8_E4M3_MAX  # (ro, ri)
    full = scale.repeat_interleave(b, 0).repeat_interleave(b, 1)[:out, :inp]
    vals = (w.detach().to(torch.float32) / full).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return Quantized(vals, scale, None)


def quantize_nvfp4(w: torch.Tensor) -> Quantized:
    """NVFP4: groups of 16 input columns, FP4 E2M1 codes (unpacked, 0..15), FP8 E4M3 group scales (`scale`)
    and a float32 per-tensor `global_scale`."""
    from compressor.kernels.fakequant import fp4_codes, nvfp4_scales, round_fp4

    out, inp = w.shape
    if inp % 16:
        raise ValueError(f"nvfp4 needs input widths that are multiples of 16, got {inp}")
    g = w.detach().to(torch.float32).reshape(out, inp // 16, 16)
    s8, gs = nvfp4_scales(g)
    s = s8.to(torch.float32) * gs
    vals = round_fp4(g / torch.where(s == 0, torch.ones_like(s), s))
    return Quantized(fp4_codes(vals).reshape(out, inp), s8.squeeze(-1), None, gs.reshape(1))


def fake_quantize_int(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                      ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize-dequantize (float32, same shape) without building storage: for searches."""
    g = _grouped(w.to(torch.float32), group_size)
    s, z = int_params(g, bits, symmetric, ratio)
    return int_dequant(int_codes(g, s, z, bits), s, z).reshape(w.shape)


def dequantize(q: Quantized, fmt: str, group_size: int, symmetric: bool) -> torch.Tensor:
    """Reference dequantization (float32), independent of QuantLinear, used to test it."""
    out, inp = q.codes.shape
    c = q.codes.to(torch.float32)
    if fmt == "int4" and symmetric:
        c = c - 8
    g = _grouped(c, group_size)
    if q.zero_point is not None:
        g = g - q.zero_point.to(torch.float32).unsqueeze(-1)
    return (g * q.scale.unsqueeze(-1)).reshape(out, inp)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = reference.to(torch.float64)
    noise = (ref - approx.to(torch.float64)).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
