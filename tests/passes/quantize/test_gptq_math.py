"""GPTQ math: lower output error than RTN on correlated inputs; non-positive-definite Hessians are survived."""

from __future__ import annotations

import pytest
import torch

from compressor.passes.quantize import _rtn_math as m
from compressor.passes.quantize._gptq_math import HessianNotPositiveDefinite, accumulate_hessian, gptq_quantize


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    inp = 128
    mix = torch.randn(inp, inp) * 0.3 + torch.eye(inp)
    x = (torch.randn(2048, inp) @ mix) * (torch.rand(inp) * 3 + 0.1)  # correlated, unevenly scaled inputs
    w = torch.randn(64, inp)
    h, n = accumulate_hessian(None, 0, x[:1000])
    h, n = accumulate_hessian(h, n, x[1000:])
    return x, w, h, n


def test_running_hessian_equals_batch_hessian(problem):
    x, _, h, n = problem
    assert n == 2048
    torch.testing.assert_close(h, 2 * x.double().T @ x.double() / 2048)


@pytest.mark.parametrize("bits,group,sym,act_order,max_ratio", [
    (4, 32, True, False, 0.7), (4, 32, False, False, 0.7), (4, 0, True, False, 0.7), (4, 32, True, True, 0.5),
    (8, 0, True, False, 0.8),
])
def test_gptq_beats_rtn_on_output_error(problem, bits, group, sym, act_order, max_ratio):
    x, w, h, _ = problem
    fmt = f"int{bits}"
    r = gptq_quantize(w, h, bits, group, sym, act_order=act_order)
    gptq = m.dequantize(r.quantized, fmt, group, sym)
    rtn = m.dequantize(m.quantize_int(w, bits, group, sym), fmt, group, sym)
    ref = x @ w.T
    err_g = ((x @ gptq.T - ref) ** 2).mean()
    err_r = ((x @ rtn.T - ref) ** 2).mean()
    assert err_g / err_r < max_ratio, float(err_g / err_r)
    # Codes respect the storage ranges of QuantLinear.
    c = r.quantized.codes
    assert (c.dtype == torch.uint8 and int(c.max()) <= 15) if bits == 4 else c.dtype in (torch.int8, torch.uint8)
    assert r.retries == 0 and r.dampening == 0.01


def test_not_positive_definite_hessian_is_retried_with_more_dampening(problem):
    _, w, h, _ = problem
    bad = h.clone()
    bad[5, 5] = -bad[5, 5] * 50  # a strongly negative direction: Cholesky fails at small dampening
    r = gptq_quantize(w, bad, 4, 32, True, damp=0.01)
    assert r.retries >= 1 and r.dampening > 0.01
    deq = m.dequantize(r.quantized, "int4", 32, True)
    assert torch.isfinite(deq).all() and m.sqnr_db(w, deq) > 10
    with pytest.raises(HessianNotPositiveDefinite):
        gptq_quantize(w, bad, 4, 32, True, damp=0.01, max_retries=0)


def test_dead_inputs_get_zero_weight(problem):
    x, w, _, _ = problem
    x = x.clone()
    x[:, 7] = 0
    h, _ = accumulate_hessian(None, 0, x)
    r = gptq_quantize(w, h, 4, 32, True)
    deq = m.dequantize(r.quantized, "int4", 32, True)
    assert torch.all(deq[:, 7] == 0)


def test_gptq_fp8_lowers_output_error_vs_rtn_fp8():
    """GPTQ on the FP8 grid: lower output error than round-to-nearest FP8, values exactly on the grid."""
    import torch

    from compressor.passes.quantize import _rtn_math as rm
    from compressor.passes.quantize._gptq_math import gptq_quantize
    from compressor.passes.quantize._smooth_math import output_error

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(48, 64, generator=g) * 0.1
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    r = gptq_quantize(w, h, "fp8", 0, True)
    assert r.quantized.codes.dtype == torch.float8_e4m3fn and r.quantized.scale.shape == (48, 1)
    deq = r.quantized.codes.float() * r.quantized.scale
    rtn = rm.quantize_fp8(w, 0)
    deq_rtn = rtn.codes.float() * rtn.scale
    assert output_error(w.double(), deq.double(), h) < 0.7 * output_error(w.double(), deq_rtn.double(), h)


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 16), (4, False, 16), (8, True, 0), ("fp8", True, 0)])
def test_gptq_keeps_pruned_weights_at_zero_and_compensates(bits, symmetric, group):
    """A 2:4-pruned layer stays exactly 2:4 after GPTQ, and the output error stays close to unmasked GPTQ's on
    the same pruned weight (the masked weights are already zero, so only compensation moves)."""
    torch.manual_seed(0)
    x = (torch.randn(512, 64) @ (torch.randn(64, 64) * 0.3 + torch.eye(64))) * torch.linspace(0.2, 3.0, 64)
    w = torch.randn(32, 64)
    keep = torch.ones_like(w, dtype=torch.bool)
    idx = w.abs().reshape(32, 16, 4).argsort(-1)[..., :2]  # the two smallest of every 4
    keep.reshape(32, 16, 4).scatter_(-1, idx, False)
    w = w * keep
    h = 2 * x.T @ x / x.shape[0]
    fmt = "fp8" if bits == "fp8" else ("int4" if bits == 4 else "int8")
    masked = gptq_quantize(w, h, bits, group, symmetric, keep=keep)
    free = gptq_quantize(w, h, bits, group, symmetric)
    deq_masked = m.dequantize(masked.quantized, fmt, group, symmetric)
    deq_free = m.dequantize(free.quantized, fmt, group, symmetric)
    assert torch.all(deq_masked[~keep] == 0)
    if bits != 8:  # without the mask, compensation moves some pruned slots off zero (int8: they round back to 0)
        assert (deq_free[~keep] != 0).any()
    err_masked = ((x @ (deq_masked - w).T) ** 2).mean()
    err_free = ((x @ (deq_free - w).T) ** 2).mean()
    assert err_masked < 2.0 * err_free, (err_masked, err_free)
