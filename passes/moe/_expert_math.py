"""Math of expert trimming and merging: pure torch/numpy functions on per-expert statistics and weights.

Criteria (a score per expert, higher = keep):
  frequency    routed token slots (how often the expert is in a token's top-k)
  router_mass  summed router probability over all tokens (also counts near misses)
  reap         REAP saliency (Lasby et al., 2025): mean over the expert's routed tokens of gate weight x
               ||expert output||_2, i.e. how much the expert changes the block's output when it is chosen

Merging (an alternative to dropping): the K most salient experts are group centres; every other expert joins
the centre it is most similar to (cosine of their outputs on the same tokens, or router co-activation); each
group's experts are aligned neuron by neuron to the centre (intermediate neurons are permutable, and experts
trained from different initialisations order them differently, so averaging unaligned weights blurs them) and
averaged with weights proportional to how often calibration routed to each.
"""

from __future__ import annotations

import numpy as np
import torch

CRITERIA = ("reap", "frequency", "router_mass")


def scores(t: dict[str, torch.Tensor], criterion: str) -> torch.Tensor:
    """(E,) keep-scores from one layer's statistics (see _stats.FIELDS)."""
    if criterion == "frequency":
        return t["counts"].clone()
    if criterion == "router_mass":
        return t["prob_mass"].clone()
    if criterion == "reap":
        return t["reap_sum"] / t["counts"].clamp_min(1)
    raise ValueError(f"unknown criterion {criterion!r} (known: {', '.join(CRITERIA)})")


def ranking(score: torch.Tensor) -> list[int]:
    """Expert indices by decreasing score; ties go to the lower index (deterministic)."""
    s = score.tolist()
    return sorted(range(len(s)), key=lambda e: (-s[e], e))


def keep_top(score: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring experts, in their original order (the trimmed router keeps the model's order)."""
    return sorted(ranking(score)[:k])


def random_keep(n: int, k: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def kept_share(values: torch.Tensor, keep: list[int]) -> float:
    """Share of a non-negative per-expert quantity held by the kept experts (1.0 if the total is 0)."""
    total = float(values.sum())
    return float(values[keep].sum()) / total if total > 0 else 1.0


def count_for_coverage(values: torch.Tensor, coverage: float, order: list[int] | None = None) -> int:
    """Smallest k whose first k experts hold at least `coverage` of the total of `values`: in `order` (e.g. a
    criterion's ranking), else the k largest values."""
    v = values.to(torch.float64)
    v = v[order] if order is not None else torch.sort(v, descending=True).values
    total = float(v.sum())
    if total <= 0:
        return len(v)
    cum = torch.cumsum(v, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(coverage - 1e-12, dtype=cum.dtype)).item()) + 1


def remove_count(n: int, fraction: float) -> int:
    """Experts removed for a fraction of n (rounded to nearest)."""
    return int(round(n * fraction))


# --- merging ------------------------------------------------------------------------------------------------


def normalized_affinity(m: torch.Tensor) -> torch.Tensor:
    """(E, E) Gram-like matrix -> cosine-style affinity m[e, f] / sqrt(m[e, e] m[f, f]) (0 where undefined)."""
    d = torch.diagonal(m).clamp_min(0).sqrt()
    denom = d[:, None] * d[None, :]
    return torch.where(denom > 0, m / denom.clamp_min(1e-300), torch.zeros_like(m))


def assign_groups(centres: list[int], affinity: torch.Tensor) -> dict[int, list[int]]:
    """Every expert joins the centre it has the highest affinity with (a centre joins itself; ties -> the
    lower centre). -> {centre: [centre, members...]} with members ascending."""
    n = affinity.shape[0]
    groups = {c: [c] for c in centres}
    cs = torch.tensor(centres)
    for e in range(n):
        if e in groups:
            continue
        a = affinity[e, cs]
        best = int(torch.nonzero(a == a.max()).flatten()[0])
        groups[centres[best]].append(e)
    return groups


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square cost matrix (Hungarian method with potentials, O(n^3)).
    -> perm with row i matched to column perm[i]."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j]: row (1-based) holding column j; column 0 is a sentinel
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # augment along the path back to the sentinel
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    perm = np.empty(n, dtype=np.int64)
    perm[match[1:] - 1] = np.arange(n)
    return perm


def greedy_assignment(score: np.ndarray) -> np.ndarray:
    """Approximate maximum-score matching for large matrices: repeatedly take the best remaining pair."""
    n = score.shape[0]
    perm = np.full(n, -1, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    order = np.argsort(-score, axis=None, kind="stable")
    for flat in order:
        i, j = divmod(int(flat), n)
        if perm[i] < 0 and not taken[j]:
            perm[i], taken[j] = j, True
    return perm


def neuron_features(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """(I, 3H): each intermediate neuron's gate row, up row and down column."""
    return torch.cat([w["gate"], w["up"], w["down"].T], dim=1).to(torch.float64)


def align(ref: dict[str, torch.Tensor], w: dict[str, torch.Tensor], exact_limit: int = 1024) -> dict:
    """Permute w's intermediate neurons to best match ref's (maximum summed inner product of neuron features).
    The permuted expert computes exactly the same function."""
    sim = (neuron_features(ref) @ neuron_features(w).T).numpy()  # (I, I): ref neuron x w neuron
    perm = linear_assignment(-sim) if sim.shape[0] <= exact_limit else greedy_assignment(sim)
    p = torch.from_numpy(perm)
    return {"gate": w["gate"][p], "up": w["up"][p], "down": w["down"][:, p]}


def weighted_average(ws: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    a = (weights / weights.sum()).to(torch.float64)
    return {k: sum(float(a[i]) * ws[i][k].to(torch.float64) for i in range(len(ws))).to(ws[0][k].dtype)
            for k in ws[0]}


def merge_router_rows(rows: torch.Tensor, weights: torch.Tensor, mode: str, centre_pos: int = 0) -> torch.Tensor:
    """(m, H) router rows of one group -> (H,). "dominant": the centre's row (the group keeps the centre's
    routing); "mean": the weighted mean of the rows."""
    if mode == "dominant":
        return rows[centre_pos].clone()
    a = (weights / weights.sum()).to(rows.dtype)
    return (a[:, None] * rows).sum(0)
