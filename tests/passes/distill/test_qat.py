"""Quantization-aware distillation: fake quantization on a QuantLinear's fixed grid (codes reproduced exactly,
straight-through gradients blocked where the grid clamps), re-packing with unchanged scales, and QAT of a
quantized tiny Llama that moves it toward its teacher while every weight stays on the original grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.kernels.qlinear import QuantLinear, unpack_int4
from compressor.passes.distill import _qat
from compressor.passes.quantize import _rtn_math as m
from compressor.passes.quantize._gptq_math import one_thread
from compressor.passes.quantize._layers import install_quantized

# (format, group_size, symmetric, fp8 block size)
SCHEMES = [("int8", 0, True, 0), ("int8", 0, False, 0), ("int8", -1, True, 0), ("int8", 16, False, 0),
           ("int4", 0, True, 0), ("int4", 16, True, 0), ("int4", 16, False, 0),
           ("fp8", 0, True, 0), ("fp8", -1, True, 0), ("fp8", 0, True, 16), ("nvfp4", 16, True, 0)]
IDS = [f"{f}-g{g}-{'sym' if s else 'asym'}{f'-b{b}' if b else ''}" for f, g, s, b in SCHEMES]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread (several threads spin-wait on a loaded 2-core machine)."""
    with one_thread():
        yield


def _quantized(fmt, group, sym, block, activations=None, seed=0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(32, 24, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 32, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(24, generator=g) * 0.1)
    if fmt == "fp8":
        q = m.quantize_fp8(lin.weight.data, group, block)
    elif fmt == "nvfp4":
        q = m.quantize_nvfp4(lin.weight.data)
    else:
        q = m.quantize_int(lin.weight.data, 4 if fmt == "int4" else 8, group, sym)
    holder = nn.Sequential(lin)
    return install_quantized(holder, "0", lin, q, fmt, group, sym, block, activations)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _by_hand(ql: QuantLinear) -> torch.Tensor:
    """scale * (code - zero point) from the stored bytes, written out per format (independent of QuantLinear)."""
    out, inp = ql.out_features, ql.in_features
    if ql.fmt == "fp8":
        s = ql.weight_scale
        if ql.block_size:
            b = ql.block_size
            s = s.repeat_interleave(b, 0)[:out].repeat_interleave(b, 1)[:, :inp]
        return ql.weight_packed.to(torch.float32) * s
    if ql.fmt == "nvfp4":
        from compressor.kernels.fakequant import FP4_GRID

        c = unpack_int4(ql.weight_packed).long()
        v = FP4_GRID[c % 8] * torch.where(c >= 8, -1.0, 1.0)
        s = (ql.weight_scale.to(torch.float32) * ql.weight_global_scale).repeat_interleave(16, 1)
        return v * s
    c = (unpack_int4(ql.weight_packed) if ql.fmt == "int4" else ql.weight_packed).to(torch.float32)
    lo, hi = {("int8", True): (-127, 127), ("int8", False): (0, 255), ("int4", True): (0, 15),
              ("int4", False): (0, 15)}[(ql.fmt, ql.symmetric)]
    assert lo <= c.min() and c.max() <= hi
    if ql.fmt == "int4" and ql.symmetric:
        c = c - 8
    groups = ql.weight_scale.shape[1]
    rep = inp // groups
    s = ql.weight_scale.repeat_interleave(rep, 1).expand(out, inp)
    z = 0.0 if ql.weight_zero_point is None else ql.weight_zero_point.to(torch.float32).repeat_interleave(rep, 1)
    return (c - z) * s


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_grid_reproduces_the_stored_codes(scheme):
    ql = _quantized(*scheme)
    codes, deq, inside = _qat.grid(ql, ql.dequantized_weight())
    assert torch.equal(_raw(codes), _raw(ql.weight_packed))
    assert torch.equal(deq, ql.dequantized_weight())
    assert bool(inside.all())
    assert torch.allclose(_by_hand(ql), ql.dequantized_weight(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("act", [None, {"format": "int8", "dynamic": True}, {"format": "fp8", "dynamic": True}])
@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[6], SCHEMES[9], SCHEMES[10]], ids=lambda s: s[0])
def test_qat_linear_starts_exactly_where_the_quantlinear_is(scheme, act):
    ql = _quantized(*scheme, activations=act)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    want = ql(x)
    q = _qat.QATLinear(ql)
    assert torch.equal(q(x), want)
    # The shadow weight lets gradients through to the layer's input despite the quantized activations.
    x.requires_grad_(True)
    q(x).sum().backward()
    assert x.grad.abs().sum() > 0 and q.weight.grad.abs().sum() > 0 and ql.bias.grad is not None


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_straight_through_gradient_is_blocked_only_where_the_grid_clamps(scheme):
    ql = _quantized(*scheme)
    w = ql.dequantized_weight().clone()
    w[0] *= 100.0  # row 0 far beyond its scale's range: saturates
    w[1] *= 1.03  # slightly off the grid, inside the range
    w.requires_grad_(True)
    y = _qat.fake_quant_ste(ql, w)
    codes, deq, inside = _qat.grid(ql, w)
    assert torch.equal(y.detach(), deq)
    y.backward(torch.ones_like(y))
    assert torch.equal(w.grad, inside.to(torch.float32))
    assert (~inside[0]).float().mean() > 0.3 and (w.grad[0] == 0).float().mean() > 0.3
    assert bool(inside[2:].all()) and inside[1].float().mean() > 0.8  # asym g16: 2 of 16 are the ends


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_repack_moves_codes_but_keeps_scales_and_zero_points(scheme):
    ql = _quantized(*scheme)
    scale = ql.weight_scale.clone()
    zero = None if ql.weight_zero_point is None else ql.weight_zero_point.clone()
    before = _raw(ql.weight_packed).clone()
    q = _qat.QATLinear(ql)
    with torch.no_grad():
        q.weight.add_(torch.randn(q.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
    trained = _qat.fake_quant_ste(ql, q.weight).detach()
    out = q.repack()
    assert out is ql
    assert torch.equal(_raw(ql.weight_scale), _raw(scale))
    assert zero is None or torch.equal(ql.weight_zero_point, zero)
    assert (_raw(ql.weight_packed) != before).float().mean() > 0.05  # the noise moved codes
    # What training computed with is exactly what the packed layer computes, and it is on the original grid.
    assert torch.equal(ql.dequantized_weight(), trained)
    assert torch.allclose(_by_hand(ql), trained, rtol=0, atol=1e-7)


def test_wrap_and_unwrap_swap_modules_and_restore_the_state_layout():
    holder = nn.Sequential(nn.Linear(32, 32))
    ql = _quantized("int4", 16, True, 0)
    holder[0] = ql
    keys = set(holder.state_dict())
    wrappers = _qat.wrap(holder)
    assert list(wrappers) == ["0"] and isinstance(holder[0], _qat.QATLinear)
    assert {n for n, _ in holder.named_parameters()} == {"0.weight", "0.bias"}
    _qat.unwrap(holder, wrappers)
    assert holder[0] is ql and set(holder.state_dict()) == keys


@pytest.mark.parametrize("rtn_cfg", [{"format": "int4", "granularity": "per_group", "group_size": 16,
                                      "symmetric": False}, {"format": "nvfp4"}], ids=["int4-g16-asym", "nvfp4"])
def test_qat_distillation_moves_a_quantized_tiny_llama_toward_its_teacher(rtn_cfg, tiny_model_dir, text_dir,
                                                                          tmp_path):
    from compressor.calibration.data import calibration_windows, eval_windows
    from compressor.context import RunContext
    from compressor.eval.metrics import compare_models
    from compressor.model import load_model
    from compressor.passes.distill.distill import DistillConfig, run
    from compressor.passes.quantize import rtn
    from compressor.recipe import ModelSpec
    from compressor.targets import get_target

    handle = load_model(ModelSpec(source=str(tiny_model_dir)))
    teacher = load_model(ModelSpec(source=str(tiny_model_dir))).model
    ctx = RunContext(get_target("cpu"), tmp_path, tmp_path / "cache", quiet=True)
    rtn.run(handle, rtn.RTNConfig(**rtn_cfg), ctx)
    qls = {n: mod for n, mod in handle.model.named_modules() if isinstance(mod, QuantLinear)}
    scales = {n: _raw(mod.weight_scale).clone() for n, mod in qls.items()}
    codes = {n: mod.weight_packed.clone() for n, mod in qls.items()}
    keys = set(handle.model.state_dict())
    held_out = eval_windows(handle.tokenizer, str(text_dir), 4, 64)
    kl_before = compare_models(teacher, handle.model, held_out)[1]["kl_divergence"]

    windows = calibration_windows(handle.tokenizer, str(text_dir), 32, 64, 0)
    ctx = RunContext(get_target("cpu"), tmp_path, tmp_path / "cache", quiet=True, calibration=lambda: windows)
    embed = handle.model.model.embed_tokens.weight.clone()
    # Embeddings and norms frozen: only the quantized layers (and their biases) learn, so the gain is QAT's.
    info = run(handle, DistillConfig(steps=80, lr=1e-4, freeze=["*embed*", "*norm*"]), ctx).info

    assert info["qat_layers"] == 14 == len(qls)
    assert info["heldout_kl_after"] < 0.6 * info["heldout_kl_before"], info
    kl_after = compare_models(teacher, handle.model, held_out)[1]["kl_divergence"]
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)  # on the evaluation's held-out windows too
    assert torch.equal(handle.model.model.embed_tokens.weight, embed)
    now = {n: mod for n, mod in handle.model.named_modules() if isinstance(mod, QuantLinear)}
    assert now.keys() == qls.keys() and set(handle.model.state_dict()) == keys
    assert not any(isinstance(mod, _qat.QATLinear) for mod in handle.model.modules())
    assert not any(p.requires_grad for p in handle.model.parameters())
    moved = 0
    for n, mod in now.items():
        assert torch.equal(_raw(mod.weight_scale), scales[n]), n
        assert torch.allclose(_by_hand(mod), mod.dequantized_weight(), rtol=0, atol=1e-7), n
        moved += int((mod.weight_packed != codes[n]).sum())
    assert moved > 100
