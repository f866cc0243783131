"""Distillation losses against hand computations: KL at temperature T with the T^2 factor, zero for equal
models, the hidden-state MSE over a layer map, next-token cross entropy, and the relative-depth layer map."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.passes.distill._losses import default_layer_map, distill_loss, feature_mse, kd_kl, next_token_ce


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kd_kl_matches_hand_computation_at_t1():
    t = torch.tensor([[1.0, 2.0, 3.0]])
    s = torch.tensor([[3.0, 1.0, 0.0]])
    want = _kl(_softmax([1, 2, 3]), _softmax([3, 1, 0]))
    # by hand: sum p (t - s) - logsumexp(t) + logsumexp(s) = 2.0603 - 3.4076 + 3.1700
    assert want == pytest.approx(1.8227, abs=1e-4)
    assert float(kd_kl(s, t, 1.0)) == pytest.approx(want, rel=1e-6)


def test_kd_kl_temperature_softens_and_is_scaled_by_t_squared():
    t = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    s = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    T = 4.0
    per_pos = [_kl(_softmax([x / T for x in tt]), _softmax([x / T for x in ss]))
               for tt, ss in zip(t.tolist(), s.tolist())]
    want = T * T * sum(per_pos) / 2  # mean over the two positions, times T^2
    assert float(kd_kl(s, t, T)) == pytest.approx(want, rel=1e-5)
    # Softened distributions are closer: the unscaled KL at T=4 is far below the KL at T=1 ...
    assert sum(per_pos) / 2 < 0.1 * float(kd_kl(s, t, 1.0))
    # ... and T^2 keeps the loss finite as T grows: T^2 KL_T tends to half the variance (under the uniform
    # distribution) of the logit difference d = t - s. By hand: d = (-2, 1, 3) has variance 38/9, d = (.5, -1, 1)
    # has 13/18; mean over positions of half of each: (38/9 + 13/18) / 4 = 1.2361.
    assert float(kd_kl(s, t, 100.0)) == pytest.approx(1.2361, rel=2e-3)


def test_kd_kl_is_zero_for_identical_logits_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 11, generator=g) * 3
    assert float(kd_kl(x, x.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_kl(x + 1.7, x, 2.0)) == pytest.approx(0.0, abs=1e-6)  # a shift of all logits changes nothing
    assert float(kd_kl(x * 0.5, x, 2.0)) > 1e-3


def test_kd_kl_gradient_pulls_the_student_toward_the_teacher():
    t = torch.tensor([[2.0, 0.0, -1.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    kd_kl(s, t, 1.0).backward()
    # d KL / d s = softmax(s) - softmax(t): the student's logit of the teacher's favourite token must rise.
    want = torch.tensor(_softmax([0, 0, 0])) - torch.tensor(_softmax([2, 0, -1]))
    assert torch.allclose(s.grad[0], want, atol=1e-6)
    assert s.grad[0, 0] < 0


def test_feature_mse_averages_matched_layers():
    s = [torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 2.0)]
    t = [torch.zeros(1, 2, 4), torch.full((1, 2, 4), 5.0), torch.full((1, 2, 4), 3.0)]
    # pairs (0 -> 1): (1 - 5)^2 = 16, (1 -> 2): (2 - 3)^2 = 1
    assert float(feature_mse(s, t, {0: 1, 1: 2})) == pytest.approx(8.5)
    assert float(feature_mse(s, t, {1: 0})) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="hidden size 4.*teacher layer 0 has 3"):
        feature_mse(s, [torch.zeros(1, 2, 3)], {0: 0})
    with pytest.raises(ValueError, match="at least one"):
        feature_mse(s, t, {})


def test_next_token_ce_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    ids = torch.tensor([[0, 0, 1]])
    # position 0 predicts token 0 (p = e^2 / (e^2 + 2)), position 1 predicts token 1 (p = e / (e + 2))
    want = -(math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(math.e / (math.e + 2))) / 2
    assert float(next_token_ce(logits, ids)) == pytest.approx(want, rel=1e-6)


def test_default_layer_map_by_relative_depth():
    assert default_layer_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert default_layer_map(2, 4) == {0: 1, 1: 3}  # layer dropping: the last blocks meet
    assert default_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}
    assert default_layer_map(1, 2) == {0: 1}
    assert default_layer_map(4, 2) == {0: 0, 1: 0, 2: 1, 3: 1}
    with pytest.raises(ValueError):
        default_layer_map(0, 2)


def test_distill_loss_adds_weighted_parts():
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (1, 5), generator=g)
    hs = [torch.randn(1, 5, 4, generator=g) for _ in range(3)]
    ht = [torch.randn(1, 5, 4, generator=g) for _ in range(3)]
    so = SimpleNamespace(logits=torch.randn(1, 5, 7, generator=g), hidden_states=hs)
    to = SimpleNamespace(logits=torch.randn(1, 5, 7, generator=g), hidden_states=ht)
    total, parts = distill_loss(so, to, ids, 2.0, feature_weight=0.5, layer_map={0: 1, 1: 0}, ce_weight=0.25)
    kl = float(kd_kl(so.logits, to.logits, 2.0))
    f = float(feature_mse(hs[1:], ht[1:], {0: 1, 1: 0}))
    ce = float(next_token_ce(so.logits, ids))
    assert parts == pytest.approx({"kl": kl, "feature": f, "ce": ce})
    assert float(total) == pytest.approx(kl + 0.5 * f + 0.25 * ce, rel=1e-6)
    total, parts = distill_loss(so, to, ids, 2.0)
    assert set(parts) == {"kl"} and float(total) == pytest.approx(kl)
