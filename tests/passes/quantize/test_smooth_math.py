"""SmoothQuant and AWQ math against straightforward references: folding keeps the function; the searched
scales and clipping lower a layer's real output error."""

from __future__ import annotations

import torch

from compressor.kernels.fakequant import activation_scale, fake_quant
from compressor.passes.quantize import _rtn_math as rm
from compressor.passes.quantize._awq_math import search_clip, search_scales
from compressor.passes.quantize._smooth_math import (fold, group_output_error, output_error, smoothquant_scales,
                                                     weight_absmax, weight_group_mean)


def _outlier_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 40.0  # a few outlier channels, as in LLM activations
    return x


def test_fold_keeps_norm_linear_function():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(32)
    norm.weight.data.uniform_(0.5, 2.0)
    norm.bias.data.normal_()
    lins = [torch.nn.Linear(32, 16), torch.nn.Linear(32, 8)]
    x = torch.randn(10, 32)
    before = [lin(norm(x)) for lin in lins]
    fold(norm, lins, torch.rand(32) * 10 + 0.1)
    after = [lin(norm(x)) for lin in lins]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after))


def test_fold_keeps_linear_linear_function():
    torch.manual_seed(0)
    up, down = torch.nn.Linear(16, 48), torch.nn.Linear(48, 16)
    x = torch.randn(5, 16)
    ref = down(torch.relu(up(x)))  # positive per-channel scales commute with ReLU
    fold(up, [down], torch.rand(48) * 5 + 0.2)
    assert torch.allclose(down(torch.relu(up(x))), ref, atol=1e-5)


def test_output_error_equals_the_direct_sum():
    torch.manual_seed(0)
    x, w, w2 = torch.randn(300, 24, dtype=torch.float64), torch.randn(10, 24, dtype=torch.float64), None
    w2 = w + 0.01 * torch.randn_like(w)
    direct = (x @ w.T - x @ w2.T).pow(2).sum()
    assert torch.allclose(output_error(w, w2, x.T @ x), direct)
    per_group = group_output_error(w, w2, x.T @ x, 8)
    assert per_group.shape == (10, 3) and float(per_group.sum()) > 0


def test_smoothquant_lowers_w8a8_error_with_outlier_channels():
    x = _outlier_inputs()
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.05
    ref = x @ w.T

    def w8a8(xs, ws):
        xq = fake_quant(xs, "int8", activation_scale(xs, "int8", per_token=True))
        wq = rm.dequantize(rm.quantize_int(ws, 8, 0, True), "int8", 0, True)
        return float((xq @ wq.T - ref).pow(2).mean())

    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data = w
    s = smoothquant_scales(x.abs().amax(0), weight_absmax([lin]), 0.5)
    plain, smooth = w8a8(x, w), w8a8(x / s, w * s)
    assert smooth < 0.25 * plain


def test_awq_scales_reduce_int4_output_error_and_never_lose_to_rtn():
    x = _outlier_inputs()
    torch.manual_seed(2)
    w = torch.randn(96, 128) * 0.05
    h = x.T @ x
    choice = search_scales([w], [h], x.abs().mean(0), weight_group_mean([torch.nn.Linear(128, 96)], 32), 4, 32, True)
    assert choice.error <= choice.error_rtn
    assert choice.alpha is not None and choice.error < 0.7 * choice.error_rtn
    # The proxy is the real thing: recompute the output error with activations in the loop.
    s = choice.scales
    w_eff = rm.fake_quantize_int(w * s, 4, 32, True) / s
    real = float((x @ w.T - x @ w_eff.T).pow(2).sum())
    assert abs(real - choice.error) / choice.error < 1e-3


def test_clip_search_never_increases_the_output_error():
    x = _outlier_inputs(seed=3)
    torch.manual_seed(3)
    w = torch.randn(32, 128) * 0.05
    w[:, 7] *= 8  # weight outliers make clipping worthwhile
    h = x.T @ x
    ratio = search_clip(w, h, 4, 32, True)
    assert ratio.shape == (32, 4, 1) and float(ratio.min()) >= 0.5
    base = group_output_error(w, rm.fake_quantize_int(w, 4, 32, True), h, 32)
    clip = group_output_error(w, rm.fake_quantize_int(w, 4, 32, True, ratio), h, 32)
    assert torch.all(clip <= base + 1e-6) and float(clip.sum()) < 0.95 * float(base.sum())
