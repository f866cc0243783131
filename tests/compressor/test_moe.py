"""MoE: fused experts split into per-expert Linear layers (same function), and experts that receive no
calibration tokens get a defined fallback, are listed, and are still quantized with finite outputs."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels.qlinear import QuantLinear
from compressor.moe import siblings, unfuse_experts
from compressor.model import load_model
from compressor.recipe import ModelSpec
from conftest import build_tiny_mixtral, run_report


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("models") / "tiny-moe", experts=8, top_k=1)


def test_unfused_experts_compute_the_same(tiny_moe_dir):
    h = load_model(ModelSpec(source=str(tiny_moe_dir)))
    ids = torch.randint(0, h.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = h.model(input_ids=ids).logits
        assert unfuse_experts(h.model) == 2
        after = h.model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    names = [n for n, _ in h.model.named_modules()]
    assert "model.layers.1.mlp.experts.7.down_proj" in names
    assert siblings("model.layers.1.mlp.experts.7.down_proj", names)[:2] == [
        "model.layers.1.mlp.experts.0.down_proj", "model.layers.1.mlp.experts.1.down_proj"]


# One sequence of 4 tokens, top-1 routing over 8 experts: at least 4 experts per layer see no token.
FEW_TOKENS = "calibration:\n  source: {text}\n  num_samples: 1\n  seq_len: 4\n"


@pytest.mark.parametrize("passes", [
    "  - {pass: quantize_gptq, format: int4, group_size: 16}",
    "  - {pass: quantize_awq, format: int4, group_size: 16}",
    "  - {pass: quantize_rtn, format: fp8, activations: {format: fp8, dynamic: false}}",
    "  - {pass: smoothquant}\n  - {pass: quantize_rtn, format: int8, activations: {format: int8}}",
])
def test_experts_without_tokens_fall_back_and_are_quantized(quant_recipe, tiny_moe_dir, text_dir, tmp_path, home,
                                                            capsys, passes):
    recipe = quant_recipe(passes, calibration=FEW_TOKENS.format(text=text_dir), model=tiny_moe_dir)
    rep = run_report(recipe, tmp_path / "out", capsys, target="h200")
    infos = [p["info"] for p in rep["passes"]]
    listed = [x for i in infos for x in (i.get("experts_without_tokens") or [])]
    assert len(listed) >= 8  # >= 4 experts per layer, each with several Linear layers
    assert rep["result"]["metrics"]["kl_divergence"] < 5.0  # finite, and not a collapse
    back = load_model(ModelSpec(source=str(tmp_path / "out" / "checkpoint")))
    experts = [m for n, m in back.model.named_modules() if ".experts." in n and n.endswith("_proj")]
    assert len(experts) == 2 * 8 * 3 and all(isinstance(m, QuantLinear) for m in experts)
    for m in experts:
        assert torch.isfinite(m.dequantized_weight()).all()
        if m.input_scale is not None:
            assert torch.isfinite(m.input_scale).all() and float(m.input_scale) > 0
    assert not isinstance(back.model.model.layers[0].mlp.gate, QuantLinear)  # routers stay in float
