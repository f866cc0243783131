"""`QuantLinear`: a Linear layer that keeps real packed weights + scales (+ zero points).

Evaluation runs the same numbers that ship: the forward dequantizes the stored codes, so the torch model,
the checkpoint and the ONNX graph all compute from one set of integers/FP8 values and scales.

Storage (buffers, written to checkpoints under these names):
  weight_packed      int8 [out, in]         bits=8 symmetric (codes in [-127, 127])
                     uint8 [out, in]        bits=8 asymmetric (codes in [0, 255])
                     uint8 [out, in // 2]   bits=4; two codes per byte, low nibble = even column
                     float8_e4m3fn [out, in] fp8
  weight_scale       float32 [out, groups]  groups = in // group_size (1 for per-channel); [1, 1] per-tensor
  weight_zero_point  uint8 [out, groups]    asymmetric only; dequant = (code - zero) * scale
For bits=4 symmetric the stored code is q + 8 (q in [-8, 7]) so that it fits an unsigned nibble.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) uint8 codes in [0, 15] -> (out, in // 2) uint8; low nibble holds the even column."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in // 2) uint8 -> (out, in) uint8 codes. Inverse of `pack_int4`."""
    low = torch.bitwise_and(packed, 15)
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


class QuantLinear(nn.Module):
    """Linear with quantized weights. Build with `from_quantized`; `dequantized_weight()` is what it computes with."""

    def __init__(self, in_features: int, out_features: int, *, fmt: str, group_size: int, symmetric: bool,
                 bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        if fmt not in ("int8", "int4", "fp8"):
            raise ValueError(f"unknown quantized format {fmt!r}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.symmetric = fmt, group_size, symmetric
        # group_size: > 0 per-group along the input dim, 0 per-channel (one group a row), -1 per-tensor.
        groups = 1 if group_size <= 0 else in_features // group_size
        if fmt == "fp8":
            packed = torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn)
        elif fmt == "int4":
            packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        else:
            packed = torch.zeros(out_features, in_features, dtype=torch.int8 if symmetric else torch.uint8)
        self.register_buffer("weight_packed", packed)
        rows = 1 if group_size == -1 else out_features  # -1: one scale for the whole tensor
        self.register_buffer("weight_scale", torch.ones(rows, groups, dtype=torch.float32))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(rows, groups, dtype=torch.uint8))
        else:
            self.weight_zero_point = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def like(cls, lin: nn.Linear, fmt: str, group_size: int, symmetric: bool) -> "QuantLinear":
        """An empty QuantLinear with `lin`'s shape, bias and dtype (codes and scales still to be filled)."""
        return cls(lin.in_features, lin.out_features, fmt=fmt, group_size=group_size, symmetric=symmetric,
                   bias=lin.bias is not None, dtype=lin.weight.dtype)

    @property
    def scheme(self) -> dict:
        return {"format": self.fmt, "group_size": self.group_size, "symmetric": self.symmetric}

    def codes(self) -> torch.Tensor:
        """(out, in) integer codes (or FP8 values) as float32, before zero point and scale."""
        if self.fmt == "int4":
            # Unpacked in float32 (exact for 0..255): the dynamo exporter lowers uint8 right shifts to a
            # mixed int8/uint8 graph that ONNX Runtime rejects, while Div/Floor/Sub are plain standard ops.
            p = self.weight_packed.to(torch.float32)
            high = torch.floor(p / 16.0)
            low = p - 16.0 * high
            return torch.stack((low, high), dim=-1).reshape(p.shape[0], p.shape[1] * 2)
        return self.weight_packed.to(torch.float32)

    def dequantized_weight(self) -> torch.Tensor:
        c = self.codes()  # (out, in)
        if self.fmt == "int4" and self.symmetric:
            c = c - 8.0
        out, inp = c.shape
        groups = self.weight_scale.shape[1]
        c = c.reshape(out, groups, inp // groups)  # (out, G, g)
        if self.weight_zero_point is not None:
            c = c - self.weight_zero_point.to(torch.float32).unsqueeze(-1)
        w = c * self.weight_scale.unsqueeze(-1)  # scale (out|1, G) broadcasts over rows and group members
        return w.reshape(out, inp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, format={self.fmt}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")
