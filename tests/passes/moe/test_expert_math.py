"""The pure math of expert trimming and merging: rankings, coverage counts, neuron alignment, grouping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from compressor.passes.moe import _expert_math as m


def _stats(counts, prob, reap_sum):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return {"counts": t(counts), "prob_mass": t(prob), "reap_sum": t(reap_sum)}


def test_criteria_rank_differently():
    # Expert 2 is rare but decisive when chosen; expert 0 is frequent but weak.
    st = _stats([100, 50, 5, 45], [40.0, 30.0, 10.0, 20.0], [10.0, 25.0, 9.0, 9.0])
    assert m.ranking(m.scores(st, "frequency")) == [0, 1, 3, 2]
    assert m.ranking(m.scores(st, "router_mass")) == [0, 1, 3, 2]
    # REAP: mean gate x norm per routed token: 0.1, 0.5, 1.8, 0.2
    assert torch.allclose(m.scores(st, "reap"), torch.tensor([0.1, 0.5, 1.8, 0.2], dtype=torch.float64))
    assert m.ranking(m.scores(st, "reap")) == [2, 1, 3, 0]
    assert m.keep_top(m.scores(st, "reap"), 2) == [1, 2]  # original order kept
    with pytest.raises(ValueError, match="unknown criterion"):
        m.scores(st, "entropy")


def test_ties_go_to_the_lower_index_and_unreached_experts_score_zero():
    st = _stats([10, 0, 10, 0], [1.0, 0.0, 1.0, 0.0], [5.0, 0.0, 5.0, 0.0])
    assert m.ranking(m.scores(st, "frequency")) == [0, 2, 1, 3]
    assert m.scores(st, "reap").tolist() == [0.5, 0.0, 0.5, 0.0]


def test_coverage_count_and_kept_share():
    mass = torch.tensor([0.5, 0.05, 0.3, 0.15], dtype=torch.float64)
    assert m.count_for_coverage(mass, 0.5) == 1
    assert m.count_for_coverage(mass, 0.8) == 2
    assert m.count_for_coverage(mass, 0.81) == 3
    assert m.count_for_coverage(mass, 1.0) == 4
    assert m.kept_share(mass, [0, 2]) == pytest.approx(0.8)
    assert m.kept_share(torch.zeros(3), [0]) == 1.0
    assert m.remove_count(8, 0.25) == 2 and m.remove_count(8, 0.5) == 4 and m.remove_count(60, 0.25) == 15


def test_random_keep_is_seeded():
    a, b, c = m.random_keep(8, 6, 0), m.random_keep(8, 6, 0), m.random_keep(8, 6, 1)
    assert a == b and len(a) == 6 and a == sorted(set(a)) and a != c


@pytest.mark.parametrize("seed", range(5))
def test_linear_assignment_is_optimal(seed):
    rng = np.random.default_rng(seed)
    cost = rng.normal(size=(6, 6))
    perm = m.linear_assignment(cost)
    best = min(itertools.permutations(range(6)), key=lambda p: sum(cost[i, p[i]] for i in range(6)))
    assert sorted(perm.tolist()) == list(range(6))
    assert sum(cost[i, perm[i]] for i in range(6)) == pytest.approx(sum(cost[i, best[i]] for i in range(6)))


def test_greedy_assignment_is_a_permutation_and_exact_on_a_permuted_identity():
    p = np.random.default_rng(0).permutation(50)
    score = np.eye(50)[p]  # row i scores 1 only at column p[i]
    assert m.greedy_assignment(score).tolist() == p.tolist()


def _expert(seed, inter=16, hidden=8):
    g = torch.Generator().manual_seed(seed)
    return {"gate": torch.randn(inter, hidden, generator=g), "up": torch.randn(inter, hidden, generator=g),
            "down": torch.randn(hidden, inter, generator=g)}


def _mlp(w, x):
    return (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def test_align_recovers_a_permuted_copy_and_keeps_the_function():
    ref = _expert(0)
    p = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    shuffled = {"gate": ref["gate"][p], "up": ref["up"][p], "down": ref["down"][:, p]}
    x = torch.randn(5, 8)
    assert torch.allclose(_mlp(shuffled, x), _mlp(ref, x), atol=1e-5)  # same function, other neuron order
    aligned = m.align(ref, shuffled)
    for k in ref:
        assert torch.equal(aligned[k], ref[k])
    # Averaging unaligned copies blurs the expert; aligned copies average to itself.
    avg = m.weighted_average([ref, shuffled], torch.tensor([1.0, 1.0]))
    assert (_mlp(avg, x) - _mlp(ref, x)).abs().max() > 0.1
    avg = m.weighted_average([ref, aligned], torch.tensor([3.0, 1.0]))
    assert torch.allclose(_mlp(avg, x), _mlp(ref, x), atol=1e-5)


def test_weighted_average_and_router_rows():
    a, b = _expert(0), _expert(1)
    avg = m.weighted_average([a, b], torch.tensor([3.0, 1.0]))
    assert torch.allclose(avg["up"], 0.75 * a["up"] + 0.25 * b["up"], atol=1e-6)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert m.merge_router_rows(rows, torch.tensor([3.0, 1.0]), "dominant").tolist() == [1.0, 0.0]
    assert m.merge_router_rows(rows, torch.tensor([3.0, 1.0]), "mean").tolist() == [0.75, 0.25]


def test_groups_join_the_most_similar_centre():
    gram = torch.tensor([[4.0, 3.9, 0.1, 0.0],
                         [3.9, 4.0, 0.0, 0.2],
                         [0.1, 0.0, 1.0, 0.9],
                         [0.0, 0.2, 0.9, 1.0]], dtype=torch.float64)
    aff = m.normalized_affinity(gram)
    assert torch.allclose(torch.diagonal(aff), torch.ones(4, dtype=torch.float64))
    assert m.assign_groups([0, 3], aff) == {0: [0, 1], 3: [3, 2]}
    # An expert no sample reached (zero row) has no affinity: it joins the first centre, never a NaN.
    gram[2, :] = gram[:, 2] = 0
    assert m.assign_groups([0, 3], m.normalized_affinity(gram)) == {0: [0, 1, 2], 3: [3]}
