"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's inputs.

Pure functions on tensors. Groups are contiguous input columns in the original order (so the storage matches
RTN's and QuantLinear's); with act_order the columns are visited in order of decreasing Hessian diagonal, and
the group parameters are computed up front from the original weight ("static groups") so that they stay
attached to their columns.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from compressor.passes.quantize._rtn_math import (FP8_E4M3_MAX, Quantized, int_codes, int_dequant, int_params, mse_clip_ratio,
                                                  to_storage)


@contextmanager
def one_thread():
    """The column loop is thousands of small ops: with several intra-op threads, each op pays thread start-up
    and, on a loaded machine, waits for busy cores (measured here: 9 s instead of 0.15 s for one 1536 x 576
    layer with the other core busy). Big matmuls outside the loop keep every thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class HessianNotPositiveDefinite(RuntimeError):
    pass


@dataclass
class GPTQResult:
    quantized: Quantized
    dampening: float  # the dampening fraction that finally worked
    retries: int  # how many times dampening was raised because H was not positive definite
    loss: float  # sum of (w - q)^2 / d^2 over columns: GPTQ's proxy for the output error


def accumulate_hessian(h: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean of 2 x^T x over tokens. x (..., in) -> H (in, in) float64 for a stable Cholesky."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    m = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    h *= n / (n + m)
    h += (2.0 / (n + m)) * x.T @ x
    return h, n + m


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; raises HessianNotPositiveDefinite."""
    h = h.clone()
    idx = torch.arange(h.shape[0])
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    lower, info = torch.linalg.cholesky_ex(h)
    del h  # each (in, in) float64 copy is freed as soon as the next exists: 1B-wide MLPs make them ~250 MB each
    if info.item() != 0:
        raise HessianNotPositiveDefinite(f"Cholesky of H failed at column {info.item()} (dampening {damp})")
    hinv = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    del hinv
    if info.item() != 0 or not torch.isfinite(upper).all():
        raise HessianNotPositiveDefinite(f"Cholesky of H^-1 failed (dampening {damp})")
    return upper


def _column_loop(W, U, perm, scales, zeros, static, g, block, params, quant, keep=None):
    """GPTQ's lazy-batch column loop (in place on W): returns (dequantized Q in W's column order, loss).
    keep (out, in) bool in W's column order, or None: weights outside it are quantized to exactly 0 (a pruned
    weight stays pruned) and their whole value counts as error, which the later columns compensate."""
    out, cols = W.shape
    n_groups = cols // g
    Q = torch.zeros_like(W)
    loss = 0.0
    done = torch.zeros(n_groups, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            gi = col // g
            if not static and not done[gi]:
                # Columns of this group are contiguous and unpermuted here (no act_order): i .. i+g in W1.
                wg = W1[:, i:i + g] if keep is None else W1[:, i:i + g] * keep[:, i1 + i:i1 + i + g]
                s, z = params(wg.unsqueeze(1))
                scales[:, gi] = s[:, 0]
                if zeros is not None:
                    zeros[:, gi] = z[:, 0]
                done[gi] = True
            s = scales[:, gi]
            z = zeros[:, gi] if zeros is not None else None
            wcol = W1[:, i:i + 1]
            q = quant(wcol, s, z)
            if keep is not None:
                q = q * keep[:, i1 + i:i1 + i + 1]  # 0 lies on every grid (asymmetric ranges include it)
            Q[:, i1 + i] = q[:, 0]
            dcol = U1[i, i]
            err = (wcol[:, 0] - q[:, 0]) / dcol
            loss += float((err**2).sum()) / 2
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, loss


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int | str, group_size: int, symmetric: bool,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  max_retries: int = 5, observer: str = "minmax", keep: torch.Tensor | None = None) -> GPTQResult:
    """w (out, in), h (in, in) -> quantized storage. group_size: > 0 per group, 0 per channel.
    bits: 4 or 8 (integer grid), or "fp8" (E4M3 grid, per-channel scales).
    observer mse: each group's range is the MSE-optimal clipping of its weights at the time it is set.
    keep (out, in) bool: the sparsity mask of a pruned layer; weights outside it come out exactly 0."""
    out, cols = w.shape
    if group_size > 0 and cols % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {cols}")
    g = group_size if group_size > 0 else cols
    block = block_size if block_size % g == 0 or g >= cols else g
    W = w.detach().to(torch.float64).clone()
    H = h.to(torch.float64).clone()
    if not torch.isfinite(H).all():
        raise HessianNotPositiveDefinite("H has NaN/Inf entries (the calibration activations overflowed)")
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Group parameters: static (from the original weight) with act_order or per-channel; else computed on the
    # updated weight when GPTQ reaches each group, as in the paper.
    static = act_order or group_size <= 0 or bits == "fp8"
    n_groups = cols // g
    scales = torch.zeros(out, n_groups, 1, dtype=torch.float64)
    zeros = None if symmetric else torch.zeros(out, n_groups, 1, dtype=torch.float64)
    fp8 = bits == "fp8"  # FP8 E4M3 grid with static scales (per channel, or per tensor with group_size -1)

    def params(wg):
        if fp8:
            return wg.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_E4M3_MAX, None
        ratio = mse_clip_ratio(wg, bits, symmetric) if observer == "mse" else 1.0
        return int_params(wg, bits, symmetric, ratio)

    def quant(wcol, s, z):
        if fp8:
            return (wcol / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(wcol.dtype) * s
        return int_dequant(int_codes(wcol, s, z, bits), s, z)

    if static:
        s, z = params(W.reshape(out, n_groups, g))
        scales[:] = s
        if zeros is not None:
            zeros[:] = z

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    if act_order:  # (without it the permutation is the identity: no copies of W and H)
        W, H = W[:, perm], H[perm][:, perm]
        if keep is not None:
            keep = keep[:, perm]
    if keep is not None:
        keep = keep.to(torch.bool).to(W.dtype)

    retries, d = 0, damp
    while True:
        try:
            U = _inverse_cholesky(H, d)
            break
        except HessianNotPositiveDefinite:
            if retries >= max_retries:
                raise
            retries += 1
            d = d * 10.0 if d > 0 else 0.01
    del H  # only U is needed from here on

    with one_thread():
        Q, loss = _column_loop(W, U, perm, scales, zeros, static, g, block, params, quant, keep)

    inv = torch.argsort(perm)
    Q = Q[:, inv]
    # Re-derive the integer codes from the dequantized values on their group's grid (exact: Q lies on it).
    Qg = Q.reshape(out, n_groups, g)
    if fp8:
        vals = (Qg / scales).to(torch.float8_e4m3fn).reshape(out, cols)  # exact: Q lies on the scaled grid
        stored = Quantized(vals, scales.squeeze(-1).to(torch.float32), None)
    else:
        codes = int_codes(Qg, scales, zeros, bits)
        stored = to_storage(codes, scales.to(torch.float32), None if zeros is None else zeros, bits, (out, cols))
    return GPTQResult(stored, d, retries, loss)
