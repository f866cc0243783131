"""Math of structured pruning (prune_structured): importance scores, which indices to keep, slicing Linear layers.

Pure torch functions; the pass (structured.py) wires them to a model. Shapes use I = intermediate size,
nh / nkv = query / key-value heads, d = head_dim, H = hidden size, g = nh // nkv (query heads per KV group).

Importance, following Minitron (Muralidharan et al., 2024) for channels and heads and ShortGPT's Block Influence
for layers, each aggregated as the MEAN over every calibration token (batch and sequence alike):
- channel: |act_fn(gate) * up|, the input of down_proj;
- head: the L2 norm over d of the head's attention output (the input of o_proj, split per head);
- layer: 1 - cos(block input, block output) per token.
Magnitude importance is the L2 norm of every weight that belongs to the unit (no calibration).
"""

from __future__ import annotations

import math

import torch


# ---- activation statistics (sums over tokens of one batch; the caller divides by the token count) ----

def channel_activation_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., I) input of down_proj -> (I,) sum over tokens of |x|."""
    return x.detach().abs().reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64)


def head_activation_sum(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(..., nh * d) input of o_proj -> (nh,) sum over tokens of each head's L2 norm over d."""
    x = x.detach().reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], -1, head_dim).to(torch.float64).norm(dim=-1).sum(0)


def block_influence_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Block input x and output y, both (..., H) -> scalar sum over tokens of 1 - cos(x, y) (Block Influence)."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    y = y.detach().reshape(-1, y.shape[-1]).to(torch.float64)
    return (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum()


# ---- magnitude importance ----

@torch.no_grad()
def channel_magnitude(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """gate, up (I, H), down (H, I) -> (I,) L2 norm of each channel's weights (gate row, up row, down column)."""
    sq = gate.double().pow(2).sum(1) + up.double().pow(2).sum(1) + down.double().pow(2).sum(0)
    return sq.sqrt()


@torch.no_grad()
def head_magnitude(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, head_dim: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (nh*d, H), k/v (nkv*d, H), o (H, nh*d) -> (per query head (nh,), per KV group (nkv,)) L2 norms.
    A query head owns its q rows and o columns; a group owns its k/v rows and all its query heads' weights."""
    nh, nkv = q.shape[0] // head_dim, k.shape[0] // head_dim
    q_sq = q.double().reshape(nh, head_dim, -1).pow(2).sum((1, 2)) \
        + o.double().reshape(o.shape[0], nh, head_dim).pow(2).sum((0, 2))
    kv_sq = (k.double().reshape(nkv, head_dim, -1).pow(2).sum((1, 2))
             + v.double().reshape(nkv, head_dim, -1).pow(2).sum((1, 2)))
    group_sq = q_sq.reshape(nkv, nh // nkv).sum(1) + kv_sq
    return q_sq.sqrt(), group_sq.sqrt()


def group_scores(head_scores: torch.Tensor, nkv: int) -> torch.Tensor:
    """(nh,) activation scores of query heads -> (nkv,) score of each KV group: the sum over its query heads."""
    return head_scores.reshape(nkv, -1).sum(1)


# ---- how many to keep ----

def kept_count(total: int, ratio: float, round_to: int = 1) -> int:
    """Units kept when removing `ratio` of `total`, rounded to the nearest multiple of round_to (halves round
    up, i.e. toward keeping more). May return 0 or total: the caller decides whether that is an error."""
    return int(math.floor(total * (1 - ratio) / round_to + 0.5)) * round_to


# ---- which to keep ----

def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order. Ties keep the lower index."""
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def select_heads(head_scores: torch.Tensor, grp_scores: torch.Tensor, kv_keep: int, per_group_keep: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `kv_keep` best KV groups, and in each of them its `per_group_keep` best query heads.
    -> (kept query heads (kv_keep * per_group_keep,), kept KV heads (kv_keep,)), ordered group by group so that
    new query head j belongs to new KV head j // per_group_keep, as repeat_kv assumes."""
    nkv = grp_scores.numel()
    g = head_scores.numel() // nkv
    kv = top_indices(grp_scores, kv_keep)
    q = [int(k) * g + top_indices(head_scores[int(k) * g:(int(k) + 1) * g], per_group_keep) for k in kv]
    return torch.cat(q), kv


def layers_to_drop(scores: torch.Tensor, n: int) -> list[int]:
    """The n layers with the lowest importance (ties: the later layer goes first), ascending."""
    order = torch.sort(scores.flip(0), stable=True).indices[:n]
    return sorted(int(scores.numel() - 1 - i) for i in order)


# ---- slicing ----

def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head indices (k,) -> the rows (k * d,) of a q/k/v projection (or columns of o_proj) they own."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


@torch.no_grad()
def slice_linear(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only the output rows (dim 0) or input columns (dim 1) of `linear` at `index`, in place: the weights
    are physically removed (new smaller Parameters), in_/out_features updated. The bias follows the rows."""
    w = linear.weight
    index = index.to(w.device)
    linear.weight = torch.nn.Parameter(w.index_select(dim, index).clone(), requires_grad=w.requires_grad)
    if dim == 0:
        linear.out_features = index.numel()
        if linear.bias is not None:
            b = linear.bias
            linear.bias = torch.nn.Parameter(b.index_select(0, index).clone(), requires_grad=b.requires_grad)
    else:
        linear.in_features = index.numel()
