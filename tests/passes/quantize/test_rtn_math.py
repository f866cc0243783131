"""RTN math and QuantLinear storage: SQNR bounds, exact round trips, packed layouts."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels.qlinear import QuantLinear, pack_int4, unpack_int4
from compressor.passes.quantize import _rtn_math as m


@pytest.fixture()
def w():
    torch.manual_seed(0)
    return torch.randn(96, 256)


def test_pack_unpack_int4_roundtrip():
    codes = torch.randint(0, 16, (7, 32), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # low nibble = even column


@pytest.mark.parametrize("bits,group,sym,min_db", [
    (8, 0, True, 38.0), (8, 64, True, 40.0), (8, 0, False, 38.0),
    (4, 64, True, 17.0), (4, 32, True, 18.0), (4, 64, False, 18.5), (4, 0, True, 13.0),
])
def test_int_sqnr_bounds(w, bits, group, sym, min_db):
    q = m.quantize_int(w, bits, group, sym)
    deq = m.dequantize(q, f"int{bits}", group, sym)
    db = m.sqnr_db(w, deq)
    # Uniform quantizer on Gaussian data: ~6 dB per bit, minus the clipping range cost.
    assert min_db < db < min_db + 12, db
    lo, hi = (0, 15) if bits == 4 else ((-127, 127) if sym else (0, 255))
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi


def test_fp8_sqnr_and_range(w):
    q = m.quantize_fp8(w, 0)
    assert q.codes.dtype == torch.float8_e4m3fn
    db = m.sqnr_db(w, m.dequantize(q, "fp8", 0, True))
    assert 28.0 < db < 36.0, db  # E4M3 has 3 mantissa bits: ~31 dB on Gaussian data


def test_group_must_divide(w):
    with pytest.raises(ValueError, match="does not divide"):
        m.quantize_int(w[:, :250], 4, 64, True)


def test_asymmetric_reproduces_weights_on_its_grid():
    """Weights on an asymmetric 4-bit grid with an integer zero point come back exactly."""
    torch.manual_seed(1)
    scale = torch.rand(8, 4, 1) * 0.1 + 0.01
    lo = -torch.randint(1, 15, (8, 4, 1)).float() * scale  # integer zero point, 0 inside the range
    codes = torch.randint(0, 16, (8, 4, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # the grid's ends are used, as RTN's min/max will find them
    grid = (lo + codes * scale).reshape(8, 128)
    q = m.quantize_int(grid, 4, 32, symmetric=False)
    deq = m.dequantize(q, "int4", 32, False)
    assert m.sqnr_db(grid, deq) > 100  # exact up to float rounding


@pytest.mark.parametrize("fmt,group,sym", [("int8", 0, True), ("int8", 0, False), ("int4", 64, True),
                                           ("int4", 32, False), ("fp8", 0, True), ("fp8", -1, True)])
def test_quantlinear_matches_reference_dequant(w, fmt, group, sym):
    q = m.quantize_fp8(w, group) if fmt == "fp8" else m.quantize_int(w, 4 if fmt == "int4" else 8, group, sym)
    ql = QuantLinear(256, 96, fmt=fmt, group_size=group, symmetric=sym, bias=True)
    ql.weight_packed.copy_(pack_int4(q.codes) if fmt == "int4" else q.codes)
    ql.weight_scale.copy_(q.scale)
    if q.zero_point is not None:
        ql.weight_zero_point.copy_(q.zero_point)
    ref = m.dequantize(q, fmt, group, sym)
    assert torch.equal(ql.dequantized_weight(), ref)
    x = torch.randn(3, 5, 256)
    torch.testing.assert_close(ql(x), torch.nn.functional.linear(x, ref, ql.bias))
    # Storage is really packed: bytes per weight.
    per_weight = ql.weight_packed.numel() * ql.weight_packed.element_size() / (96 * 256)
    assert per_weight == (0.5 if fmt == "int4" else 1.0)


def test_sqnr_of_identical_is_inf(w):
    assert m.sqnr_db(w, w) == float("inf")
