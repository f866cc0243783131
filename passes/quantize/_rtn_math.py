"""Round-to-nearest quantization math: pure functions on weight tensors, no modules, no I/O.

Conventions (see compressor.kernels.qlinear for the storage these feed):
- group_size > 0: groups of that many consecutive input columns; 0: one group per output row; -1: whole tensor.
- symmetric int: scale = amax / qmax, code = clamp(round(w / scale), qmin, qmax).
- asymmetric int: scale = (max - min) / (2^bits - 1), zero = round(-min / scale), code = clamp(round(w/scale) + zero).
- fp8 (E4M3): scale = amax / 448, value = fp8(w / scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_E4M3_MAX = 448.0
_EPS = 1e-12


@dataclass
class Quantized:
    codes: torch.Tensor  # (out, in): int8/uint8 codes (int4 codes unpacked, 0..15) or float8_e4m3fn values
    scale: torch.Tensor  # (out|1, groups) float32
    zero_point: torch.Tensor | None  # (out|1, groups) uint8, asymmetric only


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


def int_params(g: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and float zero point) for the last dimension of `g` (..., group). Shapes (..., 1)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1  # 127 or 7
        return g.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / qmax, None
    qmax = 2**bits - 1
    lo = g.amin(dim=-1, keepdim=True).clamp_max(0.0)  # include 0 so it is exactly representable
    hi = g.amax(dim=-1, keepdim=True).clamp_min(0.0)
    scale = ((hi - lo) / qmax).clamp_min(_EPS)
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax)


def int_codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes as float: symmetric q in [-127, 127] (int8) or [-8, 7] (int4); asymmetric in [0, 2^bits - 1]."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if bits == 8 else -(2 ** (bits - 1))
        return torch.clamp(torch.round(g / scale), qmin, qmax)
    return torch.clamp(torch.round(g / scale) + zero, 0, 2**bits - 1)


def int_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (codes - zero) * scale if zero is not None else codes * scale


def to_storage(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, shape) -> "Quantized":
    """Float codes (rows, G, g) + params (rows, G, 1) -> the Quantized storage QuantLinear takes."""
    out, inp = shape
    if zero is None:
        codes = (q + 8).to(torch.uint8) if bits == 4 else q.to(torch.int8)
    else:
        codes = q.to(torch.uint8)
    return Quantized(codes.reshape(out, inp), scale.squeeze(-1),
                     None if zero is None else zero.squeeze(-1).to(torch.uint8))


def quantize_int(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> Quantized:
    """RTN integer quantization of a (out, in) weight. int4 codes are returned unsigned (0..15)."""
    g = _grouped(w.detach().to(torch.float32), group_size)
    scale, zero = int_params(g, bits, symmetric)
    return to_storage(int_codes(g, scale, zero, bits), scale, zero, bits, w.shape)


def quantize_fp8(w: torch.Tensor, group_size: int) -> Quantized:
    """FP8 E4M3 with per-channel (0) or per-tensor (-1) scales."""
    if group_size > 0:
        raise ValueError("fp8 weights take per-channel or per-tensor scales here")
    out, inp = w.shape
    g = _grouped(w.detach().to(torch.float32), group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / FP8_E4M3_MAX
    vals = (g / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return Quantized(vals.reshape(out, inp), scale.squeeze(-1), None)


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
