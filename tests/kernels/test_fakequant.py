"""FP4 grid, NVFP4 and activation fake-quant: exact grids, rounding, error bounds that could fail."""

from __future__ import annotations

import torch

from compressor.kernels.fakequant import (FP4_GRID, activation_scale, fake_quant, fake_quant_activation,
                                          fake_quant_nvfp4, fp4_codes, fp4_values, round_fp4)
from compressor.passes.quantize._rtn_math import sqnr_db


def test_fp4_codes_round_trip_every_value():
    vals = torch.cat([FP4_GRID, -FP4_GRID[1:]])
    codes = fp4_codes(vals)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.equal(fp4_values(codes), vals)
    assert len(set(codes.tolist())) == 15  # +0 and the 14 signed non-zero values


def test_round_fp4_nearest_with_ties_to_even_code():
    x = torch.tensor([0.24, 0.26, 0.75, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -2.6, -100.0])
    want = torch.tensor([0.0, 0.5, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -3.0, -6.0])
    assert torch.equal(round_fp4(x), want)


def test_nvfp4_fake_quant_error_bounds():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    q = fake_quant_nvfp4(x)
    # E2M1 with a per-16 scale: ~ 4 bits of mantissa-ish precision; measured ~20 dB on Gaussians.
    assert 17.0 < sqnr_db(x, q) < 24.0
    # Every group of 16 dequantizes onto scale * FP4 grid: at most 8 magnitudes per group (plus zero).
    g = q.reshape(-1, 16).abs()
    assert all(len(set(row.tolist())) <= 8 for row in g)


def test_int8_per_token_fake_quant_error_is_bounded_by_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(8, 100) * torch.linspace(0.1, 10, 8)[:, None]
    s = activation_scale(x, "int8", per_token=True)
    q = fake_quant(x, "int8", s)
    assert torch.all((q - x).abs() <= s / 2 + 1e-6)
    # Per-token keeps the small-range token accurate, where one scale for the tensor flattens it.
    per_tensor = fake_quant(x, "int8", activation_scale(x, "int8", per_token=False))
    assert sqnr_db(x[0], q[0]) > 40.0 > 10.0 > sqnr_db(x[0], per_tensor[0])


def test_fp8_dynamic_activation_keeps_relative_error_small():
    torch.manual_seed(0)
    x = torch.randn(16, 300) * 3
    q = fake_quant_activation(x, "fp8", True, None)
    assert 28.0 < sqnr_db(x, q) < 40.0  # E4M3: 3 mantissa bits, ~31 dB on Gaussians
