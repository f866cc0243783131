"""SparseGPT (Frantar & Alistarh, 2023): prune a weight column by column and let the remaining weights absorb the
error, by the optimal brain surgeon update under the layer's input Hessian H = 2 X^T X.

For the columns j visited in order, with U the upper Cholesky factor of H^-1 (so U_jj^2 is [H^-1]_jj for the
columns not yet visited), pruning w_ij costs w_ij^2 / U_jj^2 and moves the not-yet-visited weights of row i by
-(w_ij / U_jj) * U_j,j+1: . The mask is chosen adaptively on the already-updated weights: for unstructured
sparsity per block of `block_size` columns (the lowest w^2 / U_jj^2 of each row in that block), for N:M per group
of M consecutive columns when the loop reaches it. Updates to later blocks are applied lazily, one matrix product
per block, as in GPTQ.

Each row loses exactly prune_count(in, sparsity) weights: block b of columns [i1, i2) takes
prune_count(i2, s) - prune_count(i1, s) of them, so the per-block counts add up to the row's.

Dampening, the Cholesky of the inverse Hessian and its retries come from the GPTQ math (_gptq_math).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.passes.prune._sparsity_math import lowest_per_row, nm_mask, prune_count
from compressor.passes.quantize._gptq_math import HessianNotPositiveDefinite, _inverse_cholesky, one_thread


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (out, in), the input's dtype: pruned entries exactly zero, the others updated
    mask: torch.Tensor  # bool (out, in): True where pruned
    dampening: float  # the dampening fraction that finally worked
    retries: int  # how many times dampening was raised because H was not positive definite
    loss: float  # sum over pruned weights of w^2 / U_jj^2 / 2: SparseGPT's proxy for the added output error


def _dampened_inverse_cholesky(h: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor, float, int]:
    """(U, dampening used, retries): dampening raised 10x per failed Cholesky, at most max_retries times."""
    retries = 0
    while True:
        try:
            return _inverse_cholesky(h, damp), damp, retries
        except HessianNotPositiveDefinite:
            if retries >= max_retries:
                raise
            retries += 1
            damp = damp * 10.0 if damp > 0 else 0.01


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                    damp: float = 0.01, block_size: int = 128, max_retries: int = 5) -> SparseGPTResult:
    """w (out, in), h (in, in) -> pruned and updated weight. Give `sparsity` (unstructured, exact per row) or
    `nm` = (N, M) (N kept of every M consecutive input columns). With N:M the block size is rounded down to a
    multiple of M (at least M), so no group straddles two blocks."""
    out, cols = w.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(f"pattern {nm[0]}:{nm[1]}: M={nm[1]} does not divide the input width {cols}")
    block = max(nm[1], block_size // nm[1] * nm[1]) if nm else block_size
    if not torch.isfinite(h).all():
        raise HessianNotPositiveDefinite("H has NaN/Inf entries (the calibration activations overflowed)")
    # An input that was always zero needs no special case: dampening makes H invertible, and its row of H^-1
    # (so of U) is zero off the diagonal, so its weights neither move nor move others; their score decides.
    U, used, retries = _dampened_inverse_cholesky(h.to(torch.float64), damp, max_retries)
    W = w.detach().to(torch.float64).clone()

    mask = torch.zeros(out, cols, dtype=torch.bool)
    loss = 0.0
    with one_thread():  # thousands of small ops: see one_thread
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            W1 = W[:, i1:i2].clone()  # (out, b), updated in place as columns are pruned
            E1 = torch.zeros_like(W1)  # each column's scaled error, for the lazy update of later blocks
            U1 = U[i1:i2, i1:i2]
            d2 = torch.diag(U1) ** 2  # (b,)
            M1 = mask[:, i1:i2]  # a view: filled below
            if nm is None:
                k = prune_count(i2, sparsity or 0.0) - prune_count(i1, sparsity or 0.0)
                M1[:] = lowest_per_row(W1**2 / d2, k)
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    g = slice(i, i + nm[1])
                    M1[:, g] = nm_mask(W1[:, g] ** 2 / d2[g], *nm)
                wcol = W1[:, i]
                err = wcol.masked_fill(~M1[:, i], 0) / U1[i, i]  # (out,): nonzero only where pruned
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                W1[:, i].masked_fill_(M1[:, i], 0)  # exact zeros (the update leaves w - w, maybe not 0)
                E1[:, i] = err
            loss += float((E1**2).sum()) / 2
            W[:, i1:i2] = W1
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return SparseGPTResult(W.to(w.dtype), mask, used, retries, loss)
