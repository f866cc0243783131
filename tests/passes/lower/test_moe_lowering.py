"""A tiny MoE model through every lowering in one recipe: the tensorrt flavour with the MoE plugin node, the
ort flavour with standard ops, the engine folder (plugin sources + build script) and the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor import tensorrt_rules
from compressor.kernels.qlinear import QuantLinear
from compressor.model import load_model
from compressor.recipe import ModelSpec
from conftest import build_tiny_mixtral, run_cli

EXPORT = """
export:
  - {pass: export_onnx, flavour: tensorrt, opset: 21}
  - {pass: export_onnx, flavour: ort, opset: 21}
  - pass: build_engine
    profiles: [{name: all, batch: [1, 1, 4], seq: [1, 8, 64], past_seq: [0, 0, 64]}]
  - pass: export_checkpoint
"""


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("models") / "tiny-mixtral")


@pytest.fixture(scope="module")
def lowered(tiny_moe_dir, text_dir, tmp_path_factory):
    """One run: INT4 (groups of 16) on every linear, experts included, then all four lowerings."""
    from conftest import tiny_eval, write_recipe

    tmp = tmp_path_factory.mktemp("moe-run")
    recipe = write_recipe(tmp / "recipe.yaml", f"""
schema_version: 1
name: tiny-moe
model:
  source: {tiny_moe_dir}
passes:
  - {{pass: quantize_rtn, format: int4, granularity: per_group, group_size: 16}}
{EXPORT}
{tiny_eval(text_dir, "{enabled: false}")}
""")
    out = tmp / "out"
    from compressor.cli import main

    assert main([str(recipe), "--target", "h200", "--out", str(out), "--quiet"]) == 0
    return out


def test_all_four_artifact_kinds(lowered):
    report = json.loads((lowered / "report" / "report.json").read_text())
    kinds = {a["kind"]: a for a in report["artifacts"]}
    assert set(kinds) == {"onnx", "engine", "checkpoint"}
    assert sorted(a.get("flavour") for a in report["artifacts"] if a["kind"] == "onnx") == ["ort", "tensorrt"]
    for name in ("onnx-tensorrt/model.onnx", "onnx-ort/model.onnx", "engine/build.sh", "engine/model.onnx"):
        assert (lowered / name).is_file(), name
    # The engine folder carries the plugin sources and builds them before trtexec loads them.
    assert (lowered / "engine" / "plugins" / "CMakeLists.txt").is_file()
    assert (lowered / "engine" / "plugins" / "plugins" / "moe_plugin.cpp").is_file()
    script = (lowered / "engine" / "build.sh").read_text()
    assert "cmake -S plugins" in script and "--dynamicPlugins=plugins/build/" in script


def test_tensorrt_flavour_has_one_plugin_node_per_moe_block_with_our_int4_bytes(lowered, tiny_moe_dir):
    m = onnx.load(str(lowered / "onnx-tensorrt" / "model.onnx"))
    assert tensorrt_rules.check_model(m) == []
    moe = [n for n in m.graph.node if n.op_type == "MoE"]
    assert len(moe) == 2 and all(n.domain == "compressor" for n in moe)
    attrs = {a.name: (a.i if a.type == onnx.AttributeProto.INT else a.s.decode()) for a in moe[0].attribute}
    assert attrs == {"top_k": 2, "num_experts": 4, "hidden": 32, "inter": 64, "weight_format": 2, "normalize": 1,
                     "plugin_namespace": "compressor", "plugin_version": "1"}
    inits = {t.name: t for t in m.graph.initializer}
    w_gu = numpy_helper.to_array(inits[moe[0].input[2]])
    s_gu = numpy_helper.to_array(inits[moe[0].input[4]])
    assert w_gu.dtype == np.int8 and w_gu.shape == (4, 128, 16) and s_gu.shape == (4, 128, 2)
    # The same bytes as the quantized model's expert 0 gate_proj (reloaded from the checkpoint).
    h = load_model(ModelSpec(source=str(lowered / "checkpoint")))
    gate = h.model.model.layers[0].mlp.experts[0].gate_proj
    assert isinstance(gate, QuantLinear)
    assert np.array_equal(w_gu[0, :64].view(np.uint8), gate.weight_packed.numpy())
    assert np.array_equal(s_gu[0, :64], gate.weight_scale.numpy())
    # No expert weight is left in the graph outside the plugin nodes.
    assert not [n for n in m.graph.node if n.op_type in ("MatMulNBits", "DequantizeLinear")
                and "experts" in n.name]


def test_plugin_reference_and_ort_flavour_match_the_model(lowered):
    manifest = json.loads((lowered / "manifest.json").read_text())
    trt, ort_ = [p for p in manifest["passes"] if p["name"] == "export_onnx"]
    assert trt["info"]["lowered"]["moe_plugin"] == 2
    # BF16 in and out of the plugin: measured 3e-3 relative error on the logits of this tiny model.
    assert max(c["max_rel_error"] for c in trt["info"]["verification"]) < 2e-2
    assert any("plugin nodes" in n for n in trt["info"]["notes"])
    # The ORT flavour runs the experts as a sparse loop of MatMulNBits: exact against the quantized model.
    assert ort_["info"]["lowered"]["matmul_nbits"] == 2 * (4 + 4 * 3)  # attention q/k/v/o + 4 experts x 3
    assert max(c["max_rel_error"] for c in ort_["info"]["verification"]) < 1e-5


def test_plugin_refuses_experts_that_quantize_activations(tiny_moe_dir, text_dir, tmp_path, capsys):
    from conftest import tiny_eval, write_recipe

    recipe = write_recipe(tmp_path / "recipe.yaml", f"""
schema_version: 1
name: tiny-moe
model:
  source: {tiny_moe_dir}
calibration:
  source: {text_dir}
  num_samples: 4
  seq_len: 32
passes:
  - {{pass: quantize_rtn, format: fp8, activations: {{format: fp8, dynamic: false}}}}
export:
  - {{pass: export_onnx, flavour: tensorrt, opset: 21}}
{tiny_eval(text_dir, "{enabled: false}")}
""")
    rc, _, err = run_cli([recipe, "--target", "h200", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "model.layers.0.mlp" in err and "moe_plugin: false" in err
    assert not (tmp_path / "o").exists()


def test_torch_reference_of_the_plugin_equals_the_fused_block(tiny_moe_dir):
    """Float experts: the plugin op (BF16 I/O) against transformers' own block."""
    from compressor.moe_plugin_export import plugin_blocks

    h = load_model(ModelSpec(source=str(tiny_moe_dir)))
    ids = torch.randint(0, h.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = h.model(input_ids=ids).logits
        with plugin_blocks(h.model) as blocks:
            got = h.model(input_ids=ids).logits
    assert blocks == ["model.layers.0.mlp", "model.layers.1.mlp"]
    rel = float((ref - got).abs().max() / ref.abs().max())
    assert 0 < rel < 2e-2  # BF16 activations and weights in the plugin: not exact, but close
