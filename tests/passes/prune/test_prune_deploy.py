"""Pruned weights stay pruned all the way to deployment: 2:4 SparseGPT, then INT4 GPTQ, then the tensorrt-flavour
ONNX and the engine folder. The ONNX records the 2:4 layers, its INT4 codes are still 2:4, the build script turns
on TensorRT's sparse weights, and the modeled cost serves the layers compressed."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.onnx_export import read_sparsity
from conftest import run_report

PASSES = """  - {pass: prune, method: sparsegpt, pattern: "2:4"}
  - {pass: quantize_gptq, format: int4, group_size: 32, symmetric: true}"""
EXPORT = """export:
  - {pass: export_onnx, flavour: tensorrt, opset: 21}
  - pass: build_engine
"""


def test_2of4_survives_gptq_and_reaches_the_engine_build(quant_recipe, tmp_path, capsys, home):
    report = run_report(quant_recipe(PASSES, export=EXPORT), tmp_path / "out", capsys, target="h200")
    out = tmp_path / "out"
    layers = read_sparsity(out / "onnx-tensorrt" / "model.onnx")
    assert len(layers) == 14 and set(layers.values()) == {"2:4"}  # 2 blocks x 7 Linears
    model = onnx.load(str(out / "onnx-tensorrt" / "model.onnx"))
    int4 = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 14
    for codes in int4:  # [in, out]: groups of 4 consecutive inputs per output column
        groups = codes.reshape(codes.shape[0] // 4, 4, codes.shape[1])
        assert np.all((groups == 0).sum(axis=1) >= 2)
    spec = json.loads((out / "engine" / "build.json").read_text())
    assert spec["sparse_weights"] is True and len(spec["sparse_2of4_layers"]) == 14
    assert "--sparsity=enable" in (out / "engine" / "build.sh").read_text()
    engine = next(p for p in report["passes"] if p["name"] == "build_engine")
    assert engine["info"]["sparse_2of4_layers"] == 14
    metrics = report["result"]["metrics"]
    assert metrics["modeled"]["sparse_2of4_layers"] == 14
    assert metrics["modeled"]["weight_bytes"] < report["baseline"]["metrics"]["modeled"]["weight_bytes"]
    # Half of every pruned layer's weights are still zero after GPTQ (exactly half, unless GPTQ rounded a kept one).
    assert metrics["parameters"] - metrics["nonzero_parameters"] >= sum(c.size for c in int4) // 2
