"""quantize_gptq on a tiny Llama through the pipeline: calibrated, layer-sequential, closer to the original
than RTN at the same bits and group size."""

from __future__ import annotations

import json

import pytest

from compressor.cli import main
from compressor.errors import RecipeError
from compressor.pipeline import load_and_plan


def _run(args, capsys):
    rc = main([str(a) for a in args])
    return rc, *capsys.readouterr()


def test_gptq_beats_rtn_in_kl(tiny_recipe, text_dir, tmp_path, home, capsys):
    calib = f"calibration:\n  source: {text_dir}\n  num_samples: 8\n  seq_len: 64\n"
    kl = {}
    for name, passes in {
        "rtn": "  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32}\n",
        "gptq": "  - {pass: quantize_gptq, format: int4, group_size: 32}\n",
    }.items():
        recipe = tiny_recipe(export="export: []")
        text = recipe.read_text()
        start = text.index("passes:\n") + len("passes:\n")
        end = text.index("\neval:")
        recipe.write_text(text[:start] + passes + text[end:] + calib)
        out = tmp_path / name
        rc, _, err = _run([recipe, "--target", "cpu", "--out", out, "--quiet", "--set", "eval.latency.enabled=false"],
                          capsys)
        assert rc == 0, err
        report = json.loads((out / "report" / "report.json").read_text())
        kl[name] = report["result"]["metrics"]["kl_divergence"]
        if name == "gptq":
            info = report["passes"][0]["info"]
            assert info["layers_quantized"] == 14 and info["calibration_tokens"] == 8 * 64
            assert info["dampening_retries"] == {}
    assert kl["gptq"] < 0.9 * kl["rtn"], kl


def test_gptq_without_calibration_is_refused_at_plan_time(tmp_path, tiny_model_dir):
    p = tmp_path / "r.yaml"
    p.write_text(f"schema_version: 1\nname: r\nmodel: {{source: {tiny_model_dir}}}\n"
                 "passes:\n  - {pass: quantize_gptq, group_size: 32}\n")
    with pytest.raises(RecipeError, match="needs calibration data"):
        load_and_plan(str(p), "cpu")


def test_changed_calibration_text_is_not_served_from_cache(tiny_recipe, text_dir, tmp_path, home, capsys):
    import shutil

    calib = tmp_path / "calib"
    shutil.copytree(text_dir, calib)
    recipe = tiny_recipe(export="export: []")
    text = recipe.read_text()
    start = text.index("passes:\n") + len("passes:\n")
    recipe.write_text(text[:start] + "  - {pass: quantize_gptq, format: int4, group_size: 32}\n"
                      + text[text.index("\neval:"):] + f"calibration:\n  source: {calib}\n  num_samples: 4\n  seq_len: 64\n")
    args = ["--target", "cpu", "--quiet", "--set", "eval.latency.enabled=false"]

    def cached(out) -> bool:
        rc, _, err = _run([recipe, "--out", tmp_path / out, *args], capsys)
        assert rc == 0, err
        return json.loads((tmp_path / out / "manifest.json").read_text())["passes"][0]["cached"]

    assert cached("a") is False
    assert cached("b") is True
    for f in sorted(calib.iterdir()):
        f.write_text(f.read_text().replace("the", "a"))
    assert cached("c") is False


def test_gptq_on_an_already_quantized_model_is_a_clear_error(tiny_recipe, text_dir, tmp_path, home, capsys):
    """RTN first leaves no Linear for GPTQ: exit 2 naming the pass, not an IndexError (exit 3)."""
    recipe = tiny_recipe(extra_passes="  - {pass: quantize_gptq, format: int4, group_size: 32}\n", export="export: []")
    recipe.write_text(recipe.read_text() + f"calibration:\n  source: {text_dir}\n  num_samples: 4\n  seq_len: 64\n")
    out = tmp_path / "o"
    rc, _, err = _run([recipe, "--target", "cpu", "--out", out, "--quiet"], capsys)
    assert rc == 2, err
    assert "quantize_gptq" in err and "no Linear layers left" in err and "Traceback" not in err
    assert not out.exists()
