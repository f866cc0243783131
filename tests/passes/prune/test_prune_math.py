"""Pruning math: exact per-row and N:M masks, Wanda's input-norm scores, and SparseGPT's OBS update, which beats
Wanda, which beats magnitude, on a least-squares problem with a few large-norm input features."""

from __future__ import annotations

import pytest
import torch

from compressor.passes.prune import _sparsity_math as sm
from compressor.passes.prune._sparsegpt_math import sparsegpt_prune
from compressor.passes.quantize._gptq_math import HessianNotPositiveDefinite


@pytest.fixture(scope="module")
def problem():
    """x (2048, 128): correlated inputs, 6 features 20x larger than the rest; w (64, 128); H = 2 x^T x / n."""
    g = torch.Generator().manual_seed(0)
    inp = 128
    mix = torch.randn(inp, inp, generator=g) * 0.3 + torch.eye(inp)
    scale = torch.ones(inp)
    scale[torch.randperm(inp, generator=g)[:6]] = 20.0
    x = (torch.randn(2048, inp, generator=g) @ mix) * scale
    w = torch.randn(64, inp, generator=g)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    return x, w, h


def _rel_err(x, w, wp) -> float:
    ref = x @ w.T
    return float(((x @ wp.T - ref) ** 2).mean() / (ref**2).mean())


@pytest.mark.parametrize("text,nm", [("2:4", (2, 4)), (" 4 : 8 ", (4, 8)), ("1:4", (1, 4))])
def test_parse_pattern(text, nm):
    assert sm.parse_pattern(text) == nm


@pytest.mark.parametrize("text", ["4:2", "0:4", "2:2", "half", "2:4:8", "-1:4"])
def test_parse_pattern_refuses(text):
    with pytest.raises(ValueError, match="pattern"):
        sm.parse_pattern(text)


@pytest.mark.parametrize("sparsity,per_row", [(0.5, 32), (0.3, 19), (0.0, 0), (0.99, 63), (0.25, 16)])
def test_row_mask_prunes_exactly_the_lowest_per_row(sparsity, per_row):
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
    mask = sm.row_mask(scores, sparsity)
    assert sm.prune_count(64, sparsity) == per_row
    assert mask.sum(1).tolist() == [per_row] * 16
    if per_row:
        pruned_max = scores.masked_fill(~mask, -1).amax(1)
        kept_min = scores.masked_fill(mask, 2).amin(1)
        assert bool((pruned_max < kept_min).all())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_prunes_m_minus_n_lowest_of_every_group(n, m):
    scores = torch.rand(8, 64, generator=torch.Generator().manual_seed(2))
    mask = sm.nm_mask(scores, n, m)
    groups = mask.reshape(8, 64 // m, m)
    assert bool((groups.sum(-1) == m - n).all())
    s = scores.reshape(8, 64 // m, m)
    assert bool((s.masked_fill(~groups, -1).amax(-1) < s.masked_fill(groups, 2).amin(-1)).all())
    w = torch.randn(8, 64).masked_fill(mask, 0)
    assert sm.nm_holds(w, n, m) and sm.sparsity_of(w) == (m - n) / m
    with pytest.raises(ValueError, match="does not divide the input width 62"):
        sm.nm_mask(scores[:, :62], n, m)


def test_wanda_keeps_small_weights_on_large_inputs():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    w[:, 3] *= 0.01  # tiny weights ...
    norms = torch.ones(32)
    norms[3] = 1000.0  # ... on a feature 1000x larger than the others
    mag = sm.row_mask(sm.magnitude_scores(w), 0.5)
    wanda = sm.row_mask(sm.wanda_scores(w, norms), 0.5)
    assert bool(mag[:, 3].all()) and not bool(wanda[:, 3].any())
    assert wanda.sum().item() == mag.sum().item() == 16 * 16


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (None, (2, 4)), (None, (4, 8))])
def test_sparsegpt_beats_wanda_beats_magnitude_on_output_error(problem, sparsity, nm):
    x, w, h = problem
    mag = w.masked_fill(sm.select_mask(sm.magnitude_scores(w), sparsity, nm), 0)
    wanda = w.masked_fill(sm.select_mask(sm.wanda_scores(w, x.norm(dim=0)), sparsity, nm), 0)
    r = sparsegpt_prune(w, h, sparsity, nm)
    e_mag, e_wanda, e_sg = _rel_err(x, w, mag), _rel_err(x, w, wanda), _rel_err(x, w, r.weight)
    assert e_sg < 0.85 * e_wanda and e_wanda < 0.2 * e_mag, (e_sg, e_wanda, e_mag)
    # The weight update is what helps: the same mask without it is worse.
    assert e_sg < 0.8 * _rel_err(x, w, w.masked_fill(r.mask, 0))
    for p in (mag, wanda, r.weight):
        assert sm.sparsity_of(p) == 0.5
    assert torch.equal(r.mask, r.weight == 0) and r.retries == 0 and r.dampening == 0.01
    if nm:
        assert bool(((r.weight.reshape(64, -1, nm[1]) == 0).sum(-1) == nm[1] - nm[0]).all())
    else:
        assert (r.weight == 0).sum(1).tolist() == [64] * 64


def test_sparsegpt_exact_per_row_with_ragged_blocks(problem):
    """Block 32 over 100 columns at 30%: the per-block counts add up to exactly 30 per row."""
    x, w, h = problem
    r = sparsegpt_prune(w[:, :100], h[:100, :100], 0.3, block_size=32)
    assert (r.weight == 0).sum(1).tolist() == [30] * 64
    # N:M with a block size that is no multiple of M: rounded down to 28, no group straddles two blocks.
    r = sparsegpt_prune(w, h, None, (2, 4), block_size=30)
    assert bool(((r.weight.reshape(64, 32, 4) == 0).sum(-1) == 2).all())


def test_sparsegpt_at_zero_sparsity_leaves_the_weight(problem):
    _, w, h = problem
    r = sparsegpt_prune(w, h, 0.0)
    assert torch.equal(r.weight, w) and not r.mask.any() and r.loss == 0.0


def test_sparsegpt_survives_a_non_positive_definite_hessian(problem):
    x, w, h = problem
    bad = h.clone()
    bad[5, 5] = -bad[5, 5] * 50
    r = sparsegpt_prune(w, bad, 0.5)
    assert r.retries >= 1 and r.dampening > 0.01
    assert torch.isfinite(r.weight).all() and sm.sparsity_of(r.weight) == 0.5
    with pytest.raises(HessianNotPositiveDefinite):
        sparsegpt_prune(w, bad, 0.5, max_retries=0)
    with pytest.raises(HessianNotPositiveDefinite, match="NaN"):
        sparsegpt_prune(w, torch.full_like(h, float("nan")), 0.5)


def test_sparsegpt_dead_inputs(problem):
    x, w, _ = problem
    x = x.clone()
    x[:, 7] = 0
    h = 2 * x.double().T @ x.double() / x.shape[0]
    r = sparsegpt_prune(w, h, 0.5)
    assert torch.isfinite(r.weight).all() and (r.weight == 0).sum(1).tolist() == [64] * 64
    kept = r.weight[:, 7] != 0  # a dead input's weights are kept as they were or pruned, never updated
    assert torch.equal(r.weight[kept, 7], w[kept, 7]) and 0 < int(kept.sum()) < 64
    with pytest.raises(HessianNotPositiveDefinite):  # undampened, a dead input makes H singular ...
        sparsegpt_prune(w, h, 0.5, damp=0.0, max_retries=0)
    r = sparsegpt_prune(w, h, 0.5, damp=0.0)  # ... and the retry dampens it
    assert r.retries == 1 and r.dampening == 0.01
