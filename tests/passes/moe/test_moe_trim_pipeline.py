"""Trimmed and merged MoE models flow on like any other model: quantization, ONNX export (ort flavour, and the
tensorrt flavour with one MoE plugin node per block, sized to the kept experts) and the checkpoint."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from compressor.model import load_model
from compressor.recipe import ModelSpec
from conftest import build_tiny_mixtral, run_cli


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("models") / "mixtral8", experts=8)


def _run(quant_recipe, tmp_path, capsys, passes: str, export: str, model) -> tuple:
    recipe = quant_recipe(passes, export=export, model=model)
    out = tmp_path / "out"
    rc, _, err = run_cli([recipe, "--target", "h200", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    return out, json.loads((out / "manifest.json").read_text())


def test_trim_then_int8_then_ort_onnx_and_checkpoint(mixtral_dir, quant_recipe, tmp_path, capsys):
    out, manifest = _run(quant_recipe, tmp_path, capsys,
                         "  - {pass: expert_trim, criterion: reap, remove_fraction: 0.25}\n"
                         "  - {pass: quantize_rtn, format: int8}",
                         "export:\n  - {pass: export_onnx, flavour: ort, opset: 21}\n  - {pass: export_checkpoint}",
                         mixtral_dir)
    rtn = next(p for p in manifest["passes"] if p["name"] == "quantize_rtn")
    # 2 layers x (q, k, v, o + 6 experts x 3 projections); lm_head ignored, routers are not Linear layers
    assert rtn["info"]["layers_quantized"] == 2 * (4 + 6 * 3)
    ort_pass = next(p for p in manifest["passes"] if p["name"] == "export_onnx")
    assert max(c["max_rel_error"] for c in ort_pass["info"]["verification"]) < 1e-4
    h = load_model(ModelSpec(source=str(out / "checkpoint")))
    assert h.config.num_local_experts == 6 and len(h.model.model.layers[0].mlp.experts) == 6
    assert h.model.model.layers[0].mlp.gate.weight.shape == (6, 32)


def test_merge_then_int4_then_tensorrt_plugin_with_the_kept_expert_count(mixtral_dir, quant_recipe, tmp_path,
                                                                       capsys):
    out, manifest = _run(quant_recipe, tmp_path, capsys,
                         "  - {pass: expert_merge, num_experts: 4, criterion: frequency}\n"
                         "  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 16}",
                         "export:\n  - {pass: export_onnx, flavour: tensorrt, opset: 21}", mixtral_dir)
    m = onnx.load(str(out / "onnx-tensorrt" / "model.onnx"))
    moe = [n for n in m.graph.node if n.op_type == "MoE"]
    assert len(moe) == 2
    attrs = {a.name: a.i for a in moe[0].attribute if a.type == onnx.AttributeProto.INT}
    assert attrs["num_experts"] == 4 and attrs["top_k"] == 2 and attrs["weight_format"] == 2
    exp = next(p for p in manifest["passes"] if p["name"] == "export_onnx")
    assert exp["info"]["lowered"]["moe_plugin"] == 2
    assert max(c["max_rel_error"] for c in exp["info"]["verification"]) < 2e-2


def test_trimmed_checkpoint_is_an_ordinary_hf_checkpoint(mixtral_dir, quant_recipe, tmp_path, capsys):
    """Without quantization the export holds no quantization_config: plain from_pretrained, same logits."""
    from transformers import AutoModelForCausalLM

    out, _ = _run(quant_recipe, tmp_path, capsys, "  - {pass: expert_trim, criterion: frequency, num_experts: 5}",
                  "export: [{pass: export_checkpoint}]", mixtral_dir)
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_local_experts"] == 5
    m = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    h = load_model(ModelSpec(source=str(out / "checkpoint")))
    x = torch.randint(3, 300, (1, 10))
    assert torch.equal(m(input_ids=x).logits, h.model(input_ids=x).logits)
