"""Quantization-aware distillation: train a float shadow of each QuantLinear's weight through fake quantization
on the layer's FIXED grid (its scales and zero points never change), then re-pack the shadow into codes.

Straight-through estimator: the forward computes with the grid value of the shadow weight (exactly what
QuantLinear computes from its codes); the backward passes the gradient unchanged where the weight lies inside
the grid's range and blocks it where the grid clamps (the weight is saturated there). Quantized activations
(`activations:` of the layer, static or dynamic scales) are applied in the forward as they are, with a plain
straight-through gradient, so the layers below still learn.

Formats: int8 and int4 (per channel, per group, per tensor; symmetric and asymmetric), fp8 E4M3 (per channel,
per tensor, blocks) and nvfp4 (E2M1 with its FP8 group scales and global scale kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.fakequant import FP4_MAX, fp4_codes, fp4_values, round_fp4
from compressor.kernels.qlinear import QuantLinear, pack_int4
from compressor.passes.quantize import _rtn_math as rtn

# Where rounding saturates: half a step beyond the largest grid value (as for the integer grids, where a value
# within half a step of the top code rounds to it unclamped). E4M3: step 32 next to 448; E2M1: step 2 next to 6.
_FP8_EDGE = rtn.FP8_E4M3_MAX + 16.0
_FP4_EDGE = FP4_MAX + 1.0


def _int_grid(ql: QuantLinear, w: torch.Tensor):
    bits = 4 if ql.fmt == "int4" else 8
    out, inp = w.shape
    groups = ql.weight_scale.shape[1]
    g = w.reshape(out, groups, inp // groups)  # (out, G, g); scale (out|1, G, 1) broadcasts as in QuantLinear
    s = ql.weight_scale.to(torch.float32).unsqueeze(-1)
    z = None if ql.weight_zero_point is None else ql.weight_zero_point.to(torch.float32).unsqueeze(-1)
    codes = rtn.int_codes(g, s, z, bits)  # rounded, zero point added, clamped to the format's range
    unclamped = torch.round(g / s) + (0.0 if z is None else z)
    deq = rtn.int_dequant(codes.clone(), s, z).reshape(out, inp)
    storage = rtn.to_storage(codes, s, z, bits, (out, inp)).codes
    if bits == 4:
        storage = pack_int4(storage)
    return storage, deq, (codes == unclamped).reshape(out, inp)


def _fp8_grid(ql: QuantLinear, w: torch.Tensor):
    out, inp = w.shape
    s = ql.weight_scale.to(torch.float32)
    if ql.block_size:
        b = ql.block_size
        s = s.repeat_interleave(b, 0)[:out].repeat_interleave(b, 1)[:, :inp]
    # (out|1, 1) per channel / per tensor broadcasts over the columns
    x = w / s
    vals = x.clamp(-rtn.FP8_E4M3_MAX, rtn.FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return vals, vals.to(torch.float32) * s, x.abs() < _FP8_EDGE


def _nvfp4_grid(ql: QuantLinear, w: torch.Tensor):
    out, inp = w.shape
    g = w.reshape(out, inp // 16, 16)
    s = (ql.weight_scale.to(torch.float32) * ql.weight_global_scale).unsqueeze(-1)  # (out, in/16, 1)
    x = g / torch.where(s == 0, torch.ones_like(s), s)  # a zero scale holds only zeros: any code dequantizes to 0
    codes = fp4_codes(round_fp4(x)).reshape(out, inp)
    deq = (fp4_values(codes).reshape(out, inp // 16, 16) * s).reshape(out, inp)
    return pack_int4(codes), deq, (x.abs() < _FP4_EDGE).reshape(out, inp)


def grid(ql: QuantLinear, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float weight (out, in) on `ql`'s fixed grid -> (codes as `ql.weight_packed` stores them, the dequantized
    weight (out, in) float32, the mask (out, in) of entries inside the grid's range). No gradient."""
    with torch.no_grad():
        w = w.detach().to(torch.float32)
        if ql.fmt in ("int8", "int4"):
            return _int_grid(ql, w)
        if ql.fmt == "fp8":
            return _fp8_grid(ql, w)
        if ql.fmt == "nvfp4":
            return _nvfp4_grid(ql, w)
    raise ValueError(f"quantization-aware training does not support format {ql.fmt!r}")


def fake_quant_ste(ql: QuantLinear, w: torch.Tensor) -> torch.Tensor:
    """Forward: the grid value of `w` (equal to what `ql` computes from the codes `grid` gives). Backward: the
    gradient of w, zeroed where the grid clamps."""
    _, deq, inside = grid(ql, w)
    return deq + (w - w.detach()) * inside


class QATLinear(nn.Module):
    """Trains in place of a QuantLinear: `weight` is the float shadow (initialised from the codes), `ql` keeps the
    fixed scales, zero points, activation scheme and (trainable) bias."""

    def __init__(self, ql: QuantLinear):
        super().__init__()
        self.ql = ql
        self.weight = nn.Parameter(ql.dequantized_weight().detach().to(torch.float32).clone())
        self.bias = ql.bias  # the same Parameter, registered here too so it keeps the layer's name ("<layer>.bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_ste(self.ql, self.weight)
        if self.ql.activations is not None:
            x = x + (self.ql.quantize_input(x) - x).detach()  # quantized value forward, identity gradient
        return F.linear(x, w.to(x.dtype), self.bias)

    @torch.no_grad()
    def repack(self) -> QuantLinear:
        """Write the shadow weight's codes into `ql` (same scales and zero points) and return it."""
        codes, _, _ = grid(self.ql, self.weight)
        self.ql.weight_packed.copy_(codes.to(self.ql.weight_packed.device))
        return self.ql


def wrap(model) -> dict[str, QATLinear]:
    """Swap every QuantLinear of `model` for a QATLinear. -> {module name: wrapper}."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    wrappers = {}
    for name in names:
        q = QATLinear(model.get_submodule(name))
        model.set_submodule(name, q)
        wrappers[name] = q
    return wrappers


def unwrap(model, wrappers: dict[str, QATLinear]) -> None:
    """Re-pack each shadow weight into its QuantLinear and put the QuantLinear back in the model."""
    for name, q in wrappers.items():
        model.set_submodule(name, q.repack())
