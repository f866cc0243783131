"""Mask selection for weight pruning: magnitude and Wanda scores, N:M masks, exact per-row unstructured masks.

Pure functions on tensors. A mask is a bool tensor shaped like the weight (out, in), True where the weight is
pruned (set to zero). Every mask is chosen per output row (the Wanda paper's comparison group), so each row of
a pruned layer holds exactly the requested number of zeros.
"""

from __future__ import annotations

import math
import re

import torch

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): in every 4 consecutive input weights of a row, 2 are kept (nonzero at most).
    Raises ValueError unless the text is N:M with 0 < N < M."""
    mt = _PATTERN.match(str(pattern))
    if not mt:
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(mt.group(1)), int(mt.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M)")
    return n, m


def prune_count(cols: int, sparsity: float) -> int:
    """How many of `cols` weights a row loses at `sparsity` (rounded half up, so 0.5 of 5 is 3)."""
    return int(math.floor(sparsity * cols + 0.5))


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """|W|: the smallest weights go first."""
    return w.detach().abs().to(torch.float32)


def wanda_scores(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2, the weight times the L2 norm of its input feature over the
    calibration tokens. w (out, in), x_norm (in,) -> (out, in)."""
    if x_norm.shape != (w.shape[1],):
        raise ValueError(f"input norms of shape {tuple(x_norm.shape)} do not match weight {tuple(w.shape)}")
    return magnitude_scores(w) * x_norm.to(torch.float32)[None, :]


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured: in each row, the prune_count(in, sparsity) lowest scores. (out, in) -> bool (out, in)."""
    return lowest_per_row(scores, prune_count(scores.shape[1], sparsity))


def lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest scores of each row (ties broken by topk). (out, in) -> bool (out, in)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        idx = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in each group of m consecutive input columns of a row, the m - n lowest scores.
    (out, in) -> bool (out, in); in must be a multiple of m."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"pattern {n}:{m}: M={m} does not divide the input width {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-row unstructured mask at `sparsity`, or the N:M mask when `nm` is given."""
    return nm_mask(scores, *nm) if nm else row_mask(scores, float(sparsity or 0.0))


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return 1.0 - int(torch.count_nonzero(w)) / max(w.numel(), 1)


def nm_holds(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive input weights of every row has at most n nonzeros."""
    rows, cols = w.shape
    return cols % m == 0 and bool(((w.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())
