"""`QuantLinear`: a Linear layer that keeps real packed weights + scales (+ zero points), and optionally
quantizes its input activations.

Evaluation runs the same numbers that ship: the forward dequantizes the stored codes (and fake-quantizes the
input where the scheme quantizes activations), so the torch model, the checkpoint and the ONNX graph all
compute from one set of integers/FP8/FP4 values and scales.

Weight storage (buffers, written to checkpoints under these names):
  weight_packed      int8 [out, in]         int8 symmetric (codes in [-127, 127])
                     uint8 [out, in]        int8 asymmetric (codes in [0, 255])
                     uint8 [out, in // 2]   int4 and nvfp4; two codes per byte, low nibble = even column
                     float8_e4m3fn [out, in] fp8
  weight_scale       float32 [out, groups]  groups = in // group_size (1 for per-channel); [1, 1] per-tensor;
                     float32 [ceil(out/B), ceil(in/B)] fp8 with B x B blocks (block_size B);
                     float8_e4m3fn [out, in // 16] nvfp4 (times weight_global_scale)
  weight_zero_point  uint8 [out, groups]    asymmetric only; dequant = (code - zero) * scale
  weight_global_scale float32 [1]           nvfp4 only
  input_scale        float32 [1]            static activation quantization only (calibrated)
For int4 symmetric the stored code is q + 8 (q in [-8, 7]) so that it fits an unsigned nibble. nvfp4 codes
are E2M1: bit 3 the sign, bits 0-2 the index into (0, .5, 1, 1.5, 2, 3, 4, 6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.fakequant import fake_quant_activation, fp4_values

FORMATS = ("int8", "int4", "fp8", "nvfp4")
ACT_FORMATS = ("int8", "fp8", "nvfp4")


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
    """Linear with quantized weights (and optionally activations). Build with `like`/`from_scheme`;
    `dequantized_weight()` is what it computes with."""

    def __init__(self, in_features: int, out_features: int, *, fmt: str, group_size: int, symmetric: bool,
                 bias: bool, dtype: torch.dtype = torch.float32, block_size: int = 0,
                 activations: dict | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantized format {fmt!r}")
        if activations is not None and activations.get("format") not in ACT_FORMATS:
            raise ValueError(f"unknown activation format {activations.get('format')!r}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.symmetric = fmt, group_size, symmetric
        self.block_size = block_size
        self.activations = dict(activations) if activations else None
        # group_size: > 0 per-group along the input dim, 0 per-channel (one group a row), -1 per-tensor.
        groups = 1 if group_size <= 0 else in_features // group_size
        rows = 1 if group_size == -1 else out_features  # -1: one scale for the whole tensor
        scale_dtype = torch.float32
        if fmt == "fp8":
            packed = torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn)
            if block_size:
                rows, groups = math.ceil(out_features / block_size), math.ceil(in_features / block_size)
        elif fmt in ("int4", "nvfp4"):
            packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
            if fmt == "nvfp4":
                rows, groups, scale_dtype = out_features, in_features // 16, torch.float8_e4m3fn
        else:
            packed = torch.zeros(out_features, in_features, dtype=torch.int8 if symmetric else torch.uint8)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", torch.ones(rows, groups, dtype=scale_dtype))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(rows, groups, dtype=torch.uint8))
        else:
            self.weight_zero_point = None
        if fmt == "nvfp4":
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32))
        if self.activations is not None and not self.activations.get("dynamic", True):
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def like(cls, lin: nn.Linear, fmt: str, group_size: int, symmetric: bool, block_size: int = 0,
             activations: dict | None = None) -> "QuantLinear":
        """An empty QuantLinear with `lin`'s shape, bias and dtype (codes and scales still to be filled)."""
        return cls(lin.in_features, lin.out_features, fmt=fmt, group_size=group_size, symmetric=symmetric,
                   bias=lin.bias is not None, dtype=lin.weight.dtype, block_size=block_size,
                   activations=activations)

    @classmethod
    def from_scheme(cls, lin: nn.Linear, scheme: dict) -> "QuantLinear":
        return cls.like(lin, scheme["format"], scheme["group_size"], scheme["symmetric"],
                        scheme.get("block_size", 0), scheme.get("activations"))

    @property
    def scheme(self) -> dict:
        s = {"format": self.fmt, "group_size": self.group_size, "symmetric": self.symmetric}
        if self.block_size:
            s["block_size"] = self.block_size
        if self.activations:
            s["activations"] = dict(self.activations)
        return s

    def codes(self) -> torch.Tensor:
        """(out, in) integer codes (or FP8 values) as float32, before zero point and scale."""
        if self.fmt in ("int4", "nvfp4"):
            # Unpacked in float32 (exact for 0..255): the dynamo exporter lowers uint8 right shifts to a
            # mixed int8/uint8 graph that ONNX Runtime rejects, while Div/Floor/Sub are plain standard ops.
            p = self.weight_packed.to(torch.float32)
            high = torch.floor(p / 16.0)
            low = p - 16.0 * high
            return torch.stack((low, high), dim=-1).reshape(p.shape[0], p.shape[1] * 2)
        return self.weight_packed.to(torch.float32)

    def dequantized_weight(self) -> torch.Tensor:
        c = self.codes()  # (out, in)
        out, inp = c.shape
        if self.fmt == "nvfp4":
            v = fp4_values(c).reshape(out, inp // 16, 16)
            s = self.weight_scale.to(torch.float32) * self.weight_global_scale
            return (v * s.unsqueeze(-1)).reshape(out, inp)
        if self.fmt == "fp8" and self.block_size:
            b = self.block_size
            s = self.weight_scale.repeat_interleave(b, 0)[:out].repeat_interleave(b, 1)[:, :inp]
            return c * s
        if self.fmt == "int4" and self.symmetric:
            c = c - 8.0
        groups = self.weight_scale.shape[1]
        c = c.reshape(out, groups, inp // groups)  # (out, G, g)
        if self.weight_zero_point is not None:
            c = c - self.weight_zero_point.to(torch.float32).unsqueeze(-1)
        w = c * self.weight_scale.unsqueeze(-1)  # scale (out|1, G) broadcasts over rows and group members
        return w.reshape(out, inp)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is None:
            return x
        return fake_quant_activation(x, self.activations["format"], self.activations.get("dynamic", True),
                                     self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        extra = f", block={self.block_size}" if self.block_size else ""
        if self.activations:
            a = self.activations
            extra += f", activations={a['format']} {'dynamic per-token' if a.get('dynamic', True) else 'static'}"
        return (f"in={self.in_features}, out={self.out_features}, format={self.fmt}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}{extra}")
