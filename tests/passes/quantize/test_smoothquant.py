"""smoothquant on a tiny Llama whose activations have outlier channels (made function-preservingly, the
inverse of smoothing): W8A8 with smoothing is much closer to the original than W8A8 without."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli, run_report


@pytest.fixture(scope="module")
def outlier_model_dir(tiny_model_dir, tmp_path_factory):
    from compressor.checkpoint_io import save_compressed
    from compressor.model import load_model
    from compressor.passes.quantize._smooth_math import fold
    from compressor.recipe import ModelSpec

    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    s = torch.ones(64)
    s[:3] = 1 / 30.0  # norm outputs of channels 0-2 become 30x larger; the next layers compensate
    for b in h.model.model.layers:
        fold(b.input_layernorm, [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj], s)
        fold(b.post_attention_layernorm, [b.mlp.gate_proj, b.mlp.up_proj], s)
    out = tmp_path_factory.mktemp("models") / "outliers"
    out.mkdir(exist_ok=True)
    save_compressed(h.model, h.tokenizer, out)
    return out


W8A8_STATIC = "  - {pass: quantize_rtn, format: int8, activations: {format: int8, dynamic: false}}"


def test_smoothquant_beats_plain_w8a8(quant_recipe, outlier_model_dir, tmp_path, home, capsys):
    kl = {}
    for name, passes in {"plain": W8A8_STATIC,
                         "smooth": "  - {pass: smoothquant, alpha: 0.5}\n" + W8A8_STATIC}.items():
        rep = run_report(quant_recipe(passes, model=outlier_model_dir, name=f"{name}.yaml"), tmp_path / name, capsys)
        kl[name] = rep["result"]["metrics"]["kl_divergence"]
        if name == "smooth":
            assert rep["passes"][0]["info"]["mappings"] == 6  # per block: qkv, gate_up, down (o: grouped KV heads)
            assert rep["passes"][1]["info"]["activation_scales"] == 14
    assert kl["smooth"] < 0.5 * kl["plain"]


def test_alpha_search_picks_per_mapping_and_is_no_worse(quant_recipe, outlier_model_dir, tmp_path, home, capsys):
    passes = "  - {pass: smoothquant, alpha_grid: [0.0, 0.25, 0.5, 0.75]}\n" + W8A8_STATIC
    rep = run_report(quant_recipe(passes, model=outlier_model_dir), tmp_path / "s", capsys)
    chosen = rep["passes"][0]["info"]["alpha_chosen"]
    assert len(chosen) == 6 and set(chosen.values()) <= {0.0, 0.25, 0.5, 0.75}
    assert any(a > 0 for a in chosen.values())  # the outlier mappings want smoothing


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_refused(quant_recipe, tmp_path, home, capsys, alpha):
    recipe = quant_recipe(f"  - {{pass: smoothquant, alpha: {alpha}}}\n" + W8A8_STATIC)
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "alpha" in err and "recipe.yaml" in err
    assert not (tmp_path / "o").exists()


def test_smoothquant_after_quantization_is_refused(quant_recipe, tmp_path, home, capsys):
    recipe = quant_recipe(W8A8_STATIC + "\n  - {pass: smoothquant}")
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "already quantized" in err and "before the quantization pass" in err
    assert not (tmp_path / "o").exists()
