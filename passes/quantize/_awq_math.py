"""AWQ (Lin et al., 2024) searches, written against layer input Hessians (see _smooth_math): pure functions.

Scale search: for alpha on a grid, s = awq_scales(mean|X|, mean|W|, alpha); the effective weight of each
layer is Q(W diag s) diag(1/s); the alpha whose summed output error tr(dW H dW^T) is smallest wins. s = 1
(plain round-to-nearest) is always a candidate, so the chosen scales never do worse than RTN on the proxy.

Clipping search: per (row, group), the range shrink ratio whose output error over H's diagonal block is
smallest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.passes.quantize._rtn_math import fake_quantize_int, int_codes, int_dequant, int_params
from compressor.passes.quantize._smooth_math import awq_scales, output_error


@dataclass
class ScaleChoice:
    alpha: float | None  # None: no scaling (s = 1) was best
    scales: torch.Tensor  # (in,)
    error: float  # output error at the chosen scales
    error_rtn: float  # output error with s = 1


def search_scales(weights: list[torch.Tensor], hessians: list[torch.Tensor], x_mean: torch.Tensor,
                  w_mean: torch.Tensor, bits: int, group: int, symmetric: bool, grid: int = 20) -> ScaleChoice:
    ws = [w.to(torch.float32) for w in weights]

    def err(s):
        total = 0.0
        for w, h in zip(ws, hessians):
            w_eff = fake_quantize_int(w * s, bits, group, symmetric) / s
            total += float(output_error(w, w_eff, h))
        return total

    ones = torch.ones_like(x_mean, dtype=torch.float32)
    e_rtn = err(ones)
    best = ScaleChoice(None, ones, e_rtn, e_rtn)
    for k in range(grid):
        a = k / grid
        s = awq_scales(x_mean.to(torch.float32), w_mean.to(torch.float32), a)
        e = err(s)
        if e < best.error:
            best = ScaleChoice(a, s, e, e_rtn)
    return best


def search_clip(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, symmetric: bool, grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) range ratio in [1 - max_shrink, 1] minimising the block-diagonal output error.
    Returns (rows, G, 1), the shape quantize_int's `ratio` takes."""
    w = w.to(torch.float32)
    out, inp = w.shape
    g = group if group > 0 else inp
    n_groups = inp // g
    wg = w.reshape(out, n_groups, g)
    hb = torch.stack([h[i:i + g, i:i + g] for i in range(0, inp, g)]).to(torch.float32)  # (G, g, g)
    best = torch.ones(out, n_groups, 1)
    best_err = torch.full((out, n_groups), float("inf"))
    for r in torch.linspace(1.0, 1.0 - max_shrink, grid).tolist():
        s, z = int_params(wg, bits, symmetric, r)
        d = (wg - int_dequant(int_codes(wg, s, z, bits), s, z)).transpose(0, 1)  # (G, out, g)
        e = (torch.bmm(d, hb) * d).sum(-1).T  # (out, G): dw_g H_gg dw_g^T
        better = e < best_err
        best[better] = r
        best_err = torch.where(better, e, best_err)
    return best if group != 0 else best.reshape(out, 1, 1)

