"""Math of SmoothQuant and AWQ: per-input-channel scales s, folding them into the model, and the losses used
to choose them. Pure functions on tensors.

Folding s (shape (in,)) into a mapping prev -> linears: prev's output channel c is divided by s_c (a norm's
weight/bias, or a Linear's row c) and every next Linear's input column c is multiplied by s_c. The product is
unchanged in exact arithmetic; quantization then sees W diag(s) and X diag(1/s).

A layer's output error under an effective weight W' = Q(W diag s) diag(1/s) over calibration inputs X is
  ||X W^T - X W'^T||^2 = tr((W - W') H (W - W')^T), H = X^T X,
so both searches use the layer's input Hessian, not the raw activations.
"""

from __future__ import annotations

import torch

_MIN = 1e-5


def smoothquant_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant (Xiao et al., 2023): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    x = x_absmax.to(torch.float32).clamp_min(_MIN)
    w = w_absmax.to(torch.float32).clamp_min(_MIN)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp_min(_MIN)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ candidate scales: s = mean|X|^alpha / mean|W_normalised|^(1 - alpha), normalised to geometric mean 1."""
    s = x_mean.clamp_min(_MIN).pow(alpha) / w_mean.clamp_min(_MIN).pow(1.0 - alpha)
    s = s / torch.sqrt(s.max() * s.min())
    return s.clamp_min(_MIN)


def weight_absmax(linears: list) -> torch.Tensor:
    """Per input column max |W| over the given Linear layers (stacked rows)."""
    return torch.cat([lin.weight.detach().abs() for lin in linears], 0).amax(dim=0).to(torch.float32)


def weight_group_mean(linears: list, group: int) -> torch.Tensor:
    """AWQ's w_mean: per input column mean of |W| normalised by its group's max."""
    w = torch.cat([lin.weight.detach().to(torch.float32) for lin in linears], 0)
    out, inp = w.shape
    g = group if group > 0 else inp
    wg = w.abs().reshape(out, inp // g, g)
    wg = wg / wg.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return wg.reshape(out, inp).mean(dim=0)


@torch.no_grad()
def fold(prev, linears: list, s: torch.Tensor, passengers: list = ()) -> None:
    """Divide prev's output channels by s, multiply the linears' (and passengers') input columns by s."""
    s = s.to(torch.float32)
    w = prev.weight
    if w.dim() == 1:  # RMSNorm / LayerNorm
        w.data = (w.data.to(torch.float32) / s).to(w.dtype)
    else:  # Linear: rows are output channels
        w.data = (w.data.to(torch.float32) / s[:, None]).to(w.dtype)
    b = getattr(prev, "bias", None)
    if b is not None:
        b.data = (b.data.to(torch.float32) / s).to(b.dtype)
    for lin in list(linears) + list(passengers):
        lin.weight.data = (lin.weight.data.to(torch.float32) * s[None, :]).to(lin.weight.dtype)


def output_error(w: torch.Tensor, w_eff: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr((W - W') H (W - W')^T): the summed squared output error over the tokens H was built from."""
    d = (w - w_eff).to(h.dtype)
    return ((d @ h) * d).sum()


def group_output_error(w: torch.Tensor, w_eff: torch.Tensor, h: torch.Tensor, g: int) -> torch.Tensor:
    """Per (row, group) output error using H's diagonal blocks: (out, G)."""
    out, inp = w.shape
    d = (w - w_eff).to(h.dtype).reshape(out, inp // g, g)
    hb = torch.stack([h[i:i + g, i:i + g] for i in range(0, inp, g)])  # (G, g, g)
    return torch.einsum("ogi,gij,ogj->og", d, hb, d)
