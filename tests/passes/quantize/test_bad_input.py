"""Bad input to the calibrated quantization passes: one clear error naming the thing, exit 2 (or 3 for a model
that breaks), and nothing written."""

from __future__ import annotations

import torch

from conftest import run_cli

GPTQ = "  - {pass: quantize_gptq, format: int4, group_size: 32}"


def _fails(recipe, tmp_path, capsys, code=2, target="cpu"):
    out = tmp_path / "o" / "run"
    rc, _, err = run_cli([recipe, "--target", target, "--out", out, "--quiet"], capsys)
    assert rc == code, err
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])
    return err


def test_calibration_longer_than_the_models_context(quant_recipe, text_dir, tmp_path, home, capsys):
    calib = f"calibration:\n  source: {text_dir}\n  num_samples: 2\n  seq_len: 2048\n"
    err = _fails(quant_recipe(GPTQ, calibration=calib), tmp_path, capsys)
    assert "calibration.seq_len 2048" in err and "context of 1024" in err


def test_calibration_set_too_small(quant_recipe, text_dir, tmp_path, home, capsys):
    calib = f"calibration:\n  source: {text_dir}\n  num_samples: 900\n  seq_len: 1000\n"
    err = _fails(quant_recipe(GPTQ, calibration=calib), tmp_path, capsys)
    assert "calibration data" in err and "900 x 1000" in err


def test_group_size_not_dividing_the_width(quant_recipe, tmp_path, home, capsys):
    err = _fails(quant_recipe("  - {pass: quantize_awq, format: int4, group_size: 48}"), tmp_path, capsys)
    assert "group_size 48 does not divide the input width 64" in err and "model.layers.0" in err


def test_scheme_illegal_on_target(quant_recipe, tmp_path, home, capsys):
    passes = "  - {pass: quantize_rtn, format: int8, activations: {format: fp8}}"
    err = _fails(quant_recipe(passes, calibration=None), tmp_path, capsys, target="a100")
    assert "fp8" in err and "a100" in err and "8.9" in err


def test_activations_that_overflow_stop_with_the_layer_name(quant_recipe, tiny_model_dir, tmp_path, home, capsys):
    from compressor.checkpoint_io import save_compressed
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    with torch.no_grad():  # finite weights whose products overflow float32 in block 1's MLP
        h.model.model.layers[1].post_attention_layernorm.weight.fill_(1e30)
        h.model.model.layers[1].mlp.up_proj.weight.fill_(1e30)
    bad = tmp_path / "overflow"
    bad.mkdir()
    save_compressed(h.model, h.tokenizer, bad)
    err = _fails(quant_recipe(GPTQ, model=bad), tmp_path, capsys, code=3)
    assert "NaN/Inf" in err and "model.layers.1.mlp.down_proj" in err
