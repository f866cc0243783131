"""NVFP4 (group-16 FP4 + FP8 scales): legal on Blackwell only, fake-quant evaluation, exact checkpoint round trip."""

from __future__ import annotations

import torch

from compressor.kernels.qlinear import QuantLinear
from compressor.model import load_model
from compressor.passes.quantize import _rtn_math as rm
from compressor.recipe import ModelSpec
from conftest import run_cli, run_report

NVFP4 = "  - {pass: quantize_rtn, format: nvfp4, activations: {format: nvfp4}}"


def test_nvfp4_weights_sqnr_and_storage():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q = rm.quantize_nvfp4(w)
    assert q.codes.shape == (48, 64) and q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (48, 4)
    lin = torch.nn.Linear(64, 48, bias=False)
    lin.weight.data = w
    from compressor.passes.quantize._layers import install_quantized

    ql = install_quantized(torch.nn.Sequential(lin), "0", lin, q, "nvfp4", 16, True)
    assert ql.weight_packed.shape == (48, 32)
    assert 17.0 < rm.sqnr_db(w, ql.dequantized_weight()) < 24.0  # between INT4 RTN and INT8


def test_nvfp4_is_refused_on_h200(quant_recipe, tmp_path, home, capsys):
    rc, _, err = run_cli(["plan", quant_recipe(NVFP4, calibration=None), "--target", "h200"], capsys)
    assert rc == 2 and "NVFP4" in err and "Blackwell" in err and "quantize_rtn" in err


def test_nvfp4_on_b200_evaluates_and_round_trips(quant_recipe, text_dir, tmp_path, home, capsys):
    rep = run_report(quant_recipe(NVFP4, calibration=None), tmp_path / "out", capsys, target="b200")
    m = rep["result"]["metrics"]
    assert 0 < m["kl_divergence"] < 1.0 and m["modeled"]["precision"] == "fp4"
    back = load_model(ModelSpec(source=str(tmp_path / "out" / "checkpoint")))
    mods = [m for m in back.model.modules() if isinstance(m, QuantLinear)]
    assert len(mods) == 14 and all(q.fmt == "nvfp4" and q.activations == {"format": "nvfp4", "dynamic": True}
                                   for q in mods)
    from compressor.calibration.data import eval_windows
    from compressor.eval.metrics import perplexity

    windows = eval_windows(back.tokenizer, str(text_dir), 4, 64)
    assert abs(perplexity(back.model, windows) - m["eval_sets"]["local"]["perplexity"]) < 1e-3
