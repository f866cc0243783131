"""quantize_awq through the pipeline on the tiny Llama: closer to the original than RTN at the same bits."""

from __future__ import annotations

from conftest import run_report


def test_awq_beats_rtn_in_kl(quant_recipe, tmp_path, home, capsys):
    kl = {}
    for name, passes in {
        "rtn": "  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32}",
        "awq": "  - {pass: quantize_awq, format: int4, group_size: 32}",
    }.items():
        rep = run_report(quant_recipe(passes, name=f"{name}.yaml"), tmp_path / name, capsys)
        kl[name] = rep["result"]["metrics"]["kl_divergence"]
        if name == "awq":
            info = rep["passes"][0]["info"]
            assert info["layers_quantized"] == 14 and info["calibration_tokens"] == 8 * 64
            assert info["output_error_vs_rtn_median"] <= 1.0
    assert 0 < kl["awq"] < kl["rtn"]


def test_w4a8_awq_with_fp8_activations(quant_recipe, tmp_path, home, capsys):
    passes = "  - {pass: quantize_awq, format: int4, group_size: 32, activations: {format: fp8, dynamic: true}}"
    rep = run_report(quant_recipe(passes), tmp_path / "out", capsys, target="h200")
    m = rep["result"]["metrics"]
    assert 0 < m["kl_divergence"] < 0.5
    assert m["modeled"]["precision"] == "fp8"
