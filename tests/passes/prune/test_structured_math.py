"""The math of prune_structured alone: importance statistics, counts, index selection, slicing."""

from __future__ import annotations

import pytest
import torch

from compressor.passes.prune import _structured_math as sm


@pytest.mark.parametrize("total,ratio,round_to,kept", [
    (1536, 0.25, 64, 1152),  # SmolLM2's MLP
    (128, 0.5, 8, 64),
    (10, 0.25, 1, 8),  # 7.5 rounds up
    (128, 0.25, 64, 128),  # 96 is half-way: keeps more (the pass then refuses a no-op)
    (100, 0.999, 64, 0),
    (9, 1 / 3, 1, 6),
])
def test_kept_count(total, ratio, round_to, kept):
    assert sm.kept_count(total, ratio, round_to) == kept


def test_channel_and_head_activation_sums():
    x = torch.tensor([[[1.0, -2.0, 0.0, 3.0]], [[-1.0, 0.5, 0.0, -3.0]]])  # (B=2, L=1, I=4)
    assert sm.channel_activation_sum(x).tolist() == [2.0, 2.5, 0.0, 6.0]
    # two heads of d=2: per token norms (sqrt(5), 3) and (sqrt(1.25), 3)
    h = sm.head_activation_sum(x, head_dim=2)
    assert torch.allclose(h, torch.tensor([5 ** 0.5 + 1.25 ** 0.5, 6.0], dtype=torch.float64))


def test_block_influence():
    x = torch.randn(2, 5, 8)
    assert sm.block_influence_sum(x, x).abs() < 1e-12
    assert torch.isclose(sm.block_influence_sum(x, -x), torch.tensor(20.0, dtype=torch.float64))
    a, b = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    a[..., 0], b[..., 1] = 1.0, 2.0  # orthogonal: BI 1
    assert torch.isclose(sm.block_influence_sum(a, b), torch.tensor(1.0, dtype=torch.float64))
    assert torch.isclose(sm.block_influence_sum(a, 3 * a), torch.tensor(0.0, dtype=torch.float64))


def test_channel_magnitude():
    gate, up, down = torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 3)
    gate[0, 0], up[1, 1], down[0, 1], down[1, 2] = 3.0, 4.0, 3.0, 2.0
    assert sm.channel_magnitude(gate, up, down).tolist() == [3.0, 5.0, 2.0]


def test_head_magnitude_owns_q_rows_o_columns_and_group_kv():
    d, H = 2, 3
    q, o = torch.zeros(4 * d, H), torch.zeros(H, 4 * d)  # 4 query heads, 2 KV groups
    k, v = torch.zeros(2 * d, H), torch.zeros(2 * d, H)
    q[2 * d, 0] = 3.0  # head 2
    o[1, 2 * d + 1] = 4.0  # head 2
    q[0, 1] = 1.0  # head 0
    k[d, 2] = 2.0  # group 1
    v[0, 0] = 5.0  # group 0
    heads, groups = sm.head_magnitude(q, k, v, o, d)
    assert heads.tolist() == [1.0, 0.0, 5.0, 0.0]
    assert torch.allclose(groups, torch.tensor([(1 + 25) ** 0.5, (25 + 4) ** 0.5], dtype=torch.float64))
    assert sm.group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [3.0, 7.0]


def test_top_indices_sorted_and_ties_keep_lower_index():
    s = torch.tensor([0.5, 2.0, 0.5, 3.0, 0.5])
    assert sm.top_indices(s, 3).tolist() == [0, 1, 3]
    assert sm.top_indices(s, 5).tolist() == [0, 1, 2, 3, 4]


def test_select_heads_orders_query_heads_by_kept_group():
    # 2 groups of 3 query heads; group 1 is the stronger one
    hs = torch.tensor([1.0, 0.0, 2.0, 5.0, 1.0, 4.0])
    q, kv = sm.select_heads(hs, sm.group_scores(hs, 2), kv_keep=1, per_group_keep=2)
    assert kv.tolist() == [1] and q.tolist() == [3, 5]
    q, kv = sm.select_heads(hs, sm.group_scores(hs, 2), kv_keep=2, per_group_keep=1)
    assert kv.tolist() == [0, 1] and q.tolist() == [2, 3]  # new head j belongs to new group j // 1


def test_layers_to_drop_lowest_and_ties_drop_the_later_layer():
    assert sm.layers_to_drop(torch.tensor([0.3, 0.1, 0.2, 0.4]), 2) == [1, 2]
    assert sm.layers_to_drop(torch.tensor([0.1, 0.5, 0.1, 0.1]), 2) == [2, 3]


def test_head_rows():
    assert sm.head_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_slice_linear_rows_with_bias_and_columns():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, bias=True)
    x = torch.randn(4, 6)
    full = lin(x)
    rows = torch.tensor([0, 3, 4])
    sm.slice_linear(lin, rows, 0)
    assert lin.weight.shape == (3, 6) and lin.bias.shape == (3,) and lin.out_features == 3
    assert torch.allclose(lin(x), full[:, rows], atol=1e-6)
    lin2 = torch.nn.Linear(6, 2, bias=True)
    cols = torch.tensor([1, 2, 5])
    ref = lin2(x * torch.isin(torch.arange(6), cols))  # zeroed inputs = removed columns
    sm.slice_linear(lin2, cols, 1)
    assert lin2.weight.shape == (2, 3) and lin2.in_features == 3 and lin2.bias.shape == (2,)
    assert torch.allclose(lin2(x[:, cols]), ref, atol=1e-6)
