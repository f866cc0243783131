"""The MoE plugin's torch oracle: equal to transformers' Mixtral / Qwen3-MoE sparse blocks, and its int4 / fp8
dequantization equal to QuantLinear's for the same codes (so the plugin computes what the checkpoint ships)."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels.moe_ref import (dequant_fp8, dequant_int4, dequant_weights, moe_reference, route,
                                        stack_linear_experts)
from compressor.kernels.qlinear import QuantLinear, pack_int4
from compressor.moe import ExpertMLP, LinearExperts


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_reference_equals_transformers_mixtral_block(top_k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=top_k)
    block = MixtralSparseMoeBlock(cfg).eval()
    _randomize(block, seed=top_k)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block(x).reshape(21, 32)
        flat = x.reshape(21, 32)
        logits = torch.nn.functional.linear(flat, block.gate.weight)  # (T, E)
        got = moe_reference(flat, logits, block.experts.gate_up_proj, block.experts.down_proj, top_k, normalize=True)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_reference_equals_transformers_qwen3_moe_block(norm_topk_prob):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                         norm_topk_prob=norm_topk_prob)
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    _randomize(block, seed=5)
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = block(x).reshape(9, 32)
        logits = torch.nn.functional.linear(x[0], block.gate.weight)
        got = moe_reference(x[0], logits, block.experts.gate_up_proj, block.experts.down_proj, 2,
                            normalize=norm_topk_prob)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_route_normalizes_only_when_asked():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 0.0, 0.0, 5.5]])
    w, idx = route(logits, 2, normalize=False)
    assert idx.tolist() == [[3, 2], [3, 0]]
    torch.testing.assert_close(w, torch.softmax(logits, -1).gather(1, idx))
    wn, _ = route(logits, 2, normalize=True)
    torch.testing.assert_close(wn.sum(-1), torch.ones(2))


def _int4_linear(out_f: int, in_f: int, group: int, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(in_f, out_f, fmt="int4", group_size=group, symmetric=True, bias=False)
    q.weight_packed.copy_(pack_int4(torch.randint(0, 16, (out_f, in_f), generator=g)))
    q.weight_scale.copy_(torch.rand(q.weight_scale.shape, generator=g) * 0.1 + 0.01)
    return q


def _fp8_linear(out_f: int, in_f: int, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(in_f, out_f, fmt="fp8", group_size=0, symmetric=True, bias=False)
    q.weight_packed.copy_((torch.randn(out_f, in_f, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn))
    q.weight_scale.copy_(torch.rand(out_f, 1, generator=g) * 0.01 + 1e-3)
    return q


@pytest.mark.parametrize("group", [0, 16, 64])
def test_int4_dequant_equals_quantlinear(group):
    q = _int4_linear(24, 64, group, seed=group)
    want = q.dequantized_weight()
    assert torch.equal(dequant_int4(q.weight_packed, q.weight_scale), want)
    # stacked over experts, and as the int8 bytes an ONNX graph carries
    packed = torch.stack([q.weight_packed, q.weight_packed]).view(torch.int8)
    scales = torch.stack([q.weight_scale, q.weight_scale])
    assert torch.equal(dequant_int4(packed, scales), torch.stack([want, want]))


def test_fp8_dequant_equals_quantlinear_including_raw_bytes():
    q = _fp8_linear(16, 40, seed=3)
    want = q.dequantized_weight()
    assert torch.equal(dequant_fp8(q.weight_packed, q.weight_scale), want)
    assert torch.equal(dequant_fp8(q.weight_packed.view(torch.uint8), q.weight_scale), want)
    assert torch.equal(dequant_fp8(q.weight_packed.view(torch.int8)[None], q.weight_scale[None]), want[None])


def test_dequant_rejects_missing_scales_and_unknown_formats():
    w = torch.zeros(2, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs scales"):
        dequant_weights(w, None, "int4")
    with pytest.raises(ValueError, match="unknown weight_format"):
        dequant_weights(w, torch.ones(2, 4, 1), "nvfp4")


def _quant_experts(fmt: str, n_exp: int, hidden: int, inter: int) -> LinearExperts:
    experts = LinearExperts()
    for e in range(n_exp):
        mlp = ExpertMLP(hidden, inter, torch.nn.functional.silu, torch.float32)
        if fmt == "int4":
            mlp.gate_proj = _int4_linear(inter, hidden, 16, 10 * e)
            mlp.up_proj = _int4_linear(inter, hidden, 16, 10 * e + 1)
            mlp.down_proj = _int4_linear(hidden, inter, 16, 10 * e + 2)
        elif fmt == "fp8":
            mlp.gate_proj, mlp.up_proj = _fp8_linear(inter, hidden, 10 * e), _fp8_linear(inter, hidden, 10 * e + 1)
            mlp.down_proj = _fp8_linear(hidden, inter, 10 * e + 2)
        else:
            _randomize(mlp, seed=e)
        experts.append(mlp)
    return experts


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int4"])
def test_stacked_quantized_experts_compute_what_linear_experts_compute(fmt):
    """The plugin inputs built from our unfused (possibly quantized) experts give LinearExperts' output."""
    n_exp, hidden, inter, top_k, tokens = 4, 32, 48, 2, 11
    experts = _quant_experts(fmt, n_exp, hidden, inter)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, n_exp, generator=g)
    w, idx = route(logits, top_k, normalize=True)
    with torch.no_grad():
        want = experts(x, idx, w)
        st = stack_linear_experts(experts)
        assert st["weight_format"] == fmt
        assert st["w_gate_up"].shape[:2] == (n_exp, 2 * inter) and st["w_down"].shape[:2] == (n_exp, hidden)
        got = moe_reference(x, logits, st["w_gate_up"], st["w_down"], top_k, True, fmt, st["s_gate_up"], st["s_down"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_reference_stays_close_to_float32():
    """The oracle in bf16 (what a bf16 torch model does) vs float32 math: the error bound the GPU check allows
    for the kernel (fp32 accumulation) must hold with room for torch's own bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    n_exp, hidden, inter, tokens = 8, 64, 128, 32
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, n_exp, generator=g)
    gu = torch.randn(n_exp, 2 * inter, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(n_exp, hidden, inter, generator=g) / inter ** 0.5
    exact = moe_reference(x, logits, gu, down, 2)
    bf = moe_reference(x.bfloat16(), logits, gu.bfloat16(), down.bfloat16(), 2).float()
    rel = (bf - exact).norm() / exact.norm()
    assert 1e-4 < rel < 2e-2
