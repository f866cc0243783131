"""build_engine (and tensorrt_rules) through the pipeline on the tiny model: the trtexec build.sh and build.json
carry every optimization profile as exact per-input shapes; without TensorRT the report says the engine was not
built; bad profiles, a missing plugin library or a missing tensorrt export are refused with exit 2.

The tiny-model ONNX exports are the slow part (~10 s each), so every test here shares one COMPRESSOR_HOME: the
tensorrt export made for the main run is reused from the lowering cache by the runs that differ only after it."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from compressor import trt_build
from conftest import run_cli, run_report

W8A8_STATIC = "  - {pass: quantize_rtn, format: int8, activations: {format: int8, dynamic: false}}"
TRT_EXPORT = """export:
  - {pass: export_onnx, flavour: tensorrt, opset: 21}
"""
# name: (batch, seq, past_seq) as (min, opt, max)
PROFILES = {"prefill": ((1, 2, 4), (1, 16, 64), (0, 0, 0)),
            "decode": ((1, 4, 8), (1, 1, 1), (1, 32, 128))}
BUILD = "  - pass: build_engine\n    profiles:\n" + "".join(
    f"      - {{name: {n}, batch: {list(b)}, seq: {list(s)}, past_seq: {list(p)}}}\n"
    for n, (b, s, p) in PROFILES.items())


def _rules(version: str) -> str:
    return f'  - {{pass: tensorrt_rules, tensorrt_version: "{version}"}}\n'


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One COMPRESSOR_HOME (cache) for the module, so the tensorrt export is made once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESSOR_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def _runs():
    return {}


@pytest.fixture()
def engine_run(_runs, shared_home, quant_recipe, tmp_path_factory, capsys):
    """W8A8 -> tensorrt export (opset 21) -> tensorrt_rules 11.5 -> build_engine with two profiles, run once."""
    if not _runs:
        recipe = quant_recipe(W8A8_STATIC, export=TRT_EXPORT + _rules("11.5") + BUILD)
        out = tmp_path_factory.mktemp("engine") / "out"
        _runs["out"], _runs["report"] = out, run_report(recipe, out, capsys)
    return _runs["out"], _runs["report"]


def _kv_shape(tiny_model_dir) -> tuple[int, int]:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    return cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _expected(tiny_model_dir, name: str) -> dict[str, list[tuple[int, ...]]]:
    """{input: [min shape, opt shape, max shape]} for one profile; total_seq = past_seq + seq."""
    kv_heads, head_dim = _kv_shape(tiny_model_dir)
    b, s, p = PROFILES[name]
    return {"input_ids": [(b[k], s[k]) for k in range(3)],
            "attention_mask": [(b[k], p[k] + s[k]) for k in range(3)],
            "past_key_values.0.key": [(b[k], kv_heads, p[k], head_dim) for k in range(3)]}


def _trtexec_argv(script: str) -> list[str]:
    line = next(x for x in script.replace("\\\n", " ").splitlines() if x.startswith("trtexec"))
    return shlex.split(line)


def test_build_script_has_one_shape_set_per_profile(engine_run, tiny_model_dir):
    out, _ = engine_run
    script_path = out / "engine" / "build.sh"
    assert script_path.is_file() and os.access(script_path, os.X_OK)
    script = script_path.read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "trtexec" in script
    argv = _trtexec_argv(script)
    assert argv[0] == "trtexec" and "--stronglyTyped" in argv and "--onnx=model.onnx" in argv
    assert "--saveEngine=model.plan" in argv
    assert not any(a.startswith("--dynamicPlugins") for a in argv) and "cmake" not in script  # no plugin nodes
    for k, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
        sets = [a[len(flag) + 1:] for a in argv if a.startswith(flag + "=")]
        assert len(sets) == len(PROFILES)  # in profile order
        for spec, name in zip(sets, PROFILES):
            parts = spec.split(",")
            for inp, shapes in _expected(tiny_model_dir, name).items():
                assert f"{inp}:{'x'.join(map(str, shapes[k]))}" in parts, (flag, name, spec)
            assert all(":" in x for x in parts)


def test_build_json_records_profiles_and_shapes(engine_run, tiny_model_dir):
    out, _ = engine_run
    spec = json.loads((out / "engine" / "build.json").read_text())
    assert spec["onnx"] == "model.onnx" and spec["strongly_typed"] is True and spec["plugin_ops"] == []
    assert [p["name"] for p in spec["profiles"]] == list(PROFILES)
    for p in spec["profiles"]:
        b, s, past = PROFILES[p["name"]]
        assert p["ranges"] == {"batch": list(b), "seq": list(s), "past_seq": list(past)}
        for inp, shapes in _expected(tiny_model_dir, p["name"]).items():
            assert p["shapes"][inp] == [list(x) for x in shapes]
    assert spec["trtexec"] == _trtexec_argv((out / "engine" / "build.sh").read_text())
    assert spec["sparse_weights"] is False and "--sparsity=enable" not in spec["trtexec"]  # not pruned 2:4


def test_engine_folder_holds_the_tensorrt_graph(engine_run):
    out, rep = engine_run
    assert (out / "engine" / "model.onnx").is_file()
    assert (out / "engine" / "model.onnx").read_bytes() == (out / "onnx-tensorrt" / "model.onnx").read_bytes()
    rules = next(p for p in rep["passes"] if p["name"] == "tensorrt_rules")
    assert (rules["info"]["tensorrt_version"], rules["info"]["findings"]) == ("11.5", 0)  # opset 21 fits 11.5


@pytest.mark.skipif(trt_build.tensorrt_available() is not None, reason="TensorRT is installed: the engine is built")
def test_without_tensorrt_the_report_says_the_engine_was_not_built(engine_run):
    out, rep = engine_run
    assert any("engine not built: TensorRT not installed" in n for n in rep["notes"]), rep["notes"]
    engine = [a for a in rep["artifacts"] if a["kind"] == "engine"]
    assert len(engine) == 1 and engine[0]["built"] is False and engine[0]["path"] == "engine/build.sh"
    assert not (out / "engine" / "model.plan").exists()
    assert "engine not built" in (out / "report" / "report.md").read_text()


def test_tensorrt_rules_pass_refuses_an_older_tensorrt(engine_run, quant_recipe, tmp_path, capsys):
    # Same quantization and export as engine_run: the export comes from the cache.
    recipe = quant_recipe(W8A8_STATIC, export=TRT_EXPORT + _rules("10.0"))
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "o", "--quiet"], capsys)
    assert rc == 2, err
    assert "tensorrt_rules" in err and "[opset]" in err and "10.0" in err and "opset 21" in err
    assert not (tmp_path / "o").exists()


def _refused(recipe, tmp_path, capsys) -> str:
    """Run a recipe that must be refused: exit 2, one line, nothing written to --out."""
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "o", "--quiet"], capsys)
    assert rc == 2, err
    assert not (tmp_path / "o").exists()
    return err


def test_profile_with_min_above_max_is_refused(shared_home, quant_recipe, tmp_path, capsys):
    build = "  - pass: build_engine\n    profiles:\n      - {name: bad, batch: [4, 2, 1]}\n"
    err = _refused(quant_recipe(W8A8_STATIC, export=TRT_EXPORT + build), tmp_path, capsys)
    assert "recipe.yaml" in err and "batch" in err and "min <= opt <= max" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_plugin_library_is_refused(shared_home, quant_recipe, tmp_path, capsys):
    lib = tmp_path / "nowhere" / "libplugins.so"
    build = f"  - {{pass: build_engine, plugin_library: {lib}}}\n"
    err = _refused(quant_recipe(W8A8_STATIC, export=TRT_EXPORT + build), tmp_path, capsys)
    assert str(lib) in err and "recipe.yaml" in err


def test_build_engine_needs_a_tensorrt_export(shared_home, quant_recipe, tmp_path, capsys):
    export = "export:\n  - {pass: export_onnx, flavour: ort, opset: 21, verify: false}\n  - {pass: build_engine}\n"
    err = _refused(quant_recipe(W8A8_STATIC, export=export), tmp_path, capsys)
    assert "build_engine" in err and "onnx-tensorrt" in err


def test_tensorrt_flavour_refuses_asymmetric_int4(shared_home, quant_recipe, tmp_path, capsys):
    passes = "  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32, symmetric: false}"
    err = _refused(quant_recipe(passes, export=TRT_EXPORT), tmp_path, capsys)
    assert "export_onnx" in err and "asymmetric" in err and "model.layers.0.self_attn.q_proj" in err


def test_a_given_plugin_library_is_copied_into_the_engine_folder(shared_home, quant_recipe, tmp_path, capsys):
    """Native code is loaded only from the run's own artifact folder: the recipe's library is copied there and
    build.sh / build.json name the copy, never the original path."""
    lib = tmp_path / "elsewhere" / "libmyplugins.so"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF not really a library")
    build = f"  - {{pass: build_engine, plugin_library: {lib}}}\n"
    out = tmp_path / "o"
    rc, _, err = run_cli([quant_recipe(W8A8_STATIC, export=TRT_EXPORT + build), "--target", "cpu", "--out", out,
                          "--quiet"], capsys)
    assert rc == 0, err
    spec = json.loads((out / "engine" / "build.json").read_text())
    assert spec["plugin_library"] == "plugins/libmyplugins.so"
    assert (out / "engine" / "plugins" / "libmyplugins.so").read_bytes() == lib.read_bytes()
    argv = _trtexec_argv((out / "engine" / "build.sh").read_text())
    assert "--dynamicPlugins=plugins/libmyplugins.so" in argv and str(lib) not in " ".join(argv)


def test_plugin_library_outside_the_engine_folder_is_refused(tmp_path):
    engine = tmp_path / "engine"
    (engine / "plugins").mkdir(parents=True)
    inside = engine / "plugins" / "lib.so"
    inside.write_bytes(b"x")
    assert trt_build.check_plugin_inside(inside, engine) == inside.resolve()
    for outside in (tmp_path / "lib.so", engine / "plugins" / ".." / ".." / "lib.so"):
        with pytest.raises(RuntimeError, match="outside the engine folder"):
            trt_build.check_plugin_inside(outside, engine)
    link = engine / "plugins" / "link.so"
    link.symlink_to(tmp_path / "lib.so")
    with pytest.raises(RuntimeError, match="outside the engine folder"):
        trt_build.check_plugin_inside(link, engine)
