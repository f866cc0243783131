"""The tensorrt and ort ONNX flavours: our codes and scales in each runtime's form, exact against torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor import tensorrt_rules
from compressor.context import RunContext
from compressor.model import load_model
from compressor.onnx_export import export_causal_lm, verify_against_torch
from compressor.onnx_lowering import check_lowerable
from compressor.recipe import ModelSpec
from compressor.registry import get_pass
from compressor.targets import get_target

INT8_STATIC = {"format": "int8", "activations": {"format": "int8", "dynamic": False}}
FP8_STATIC = {"format": "fp8", "activations": {"format": "fp8", "dynamic": False}}
INT4_G32 = {"format": "int4", "granularity": "per_group", "group_size": 32}
INT4_G32_ASYM = {**INT4_G32, "symmetric": False}
FP8_BLOCK = {"format": "fp8", "granularity": "per_block", "block_size": 32}


def _quantized(tiny_model_dir, tmp_path, cfg):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, h.config.vocab_size, (4, 32), generator=g)
    ctx = RunContext(get_target("cpu"), tmp_path, tmp_path, quiet=True, calibration=lambda: calib)
    rtn = get_pass("quantize_rtn")
    rtn.run(h, rtn.config(**cfg), ctx)
    return h


def _nodes(m, op):
    return [n for n in m.graph.node if n.op_type == op]


def _inits(m):
    return {i.name: i for i in m.graph.initializer}


# (quantize_rtn config, flavour, {form: count} reported by the lowering). The tiny Llama has 14 linears.
CASES = {
    "int8-w8a8-tensorrt": (INT8_STATIC, "tensorrt", {"weight_dq": 14, "activation_qdq": 14}),
    "int8-w8a8-ort": (INT8_STATIC, "ort", {"weight_dq": 14, "activation_qdq": 14}),
    "int4-tensorrt": (INT4_G32, "tensorrt", {"weight_dq": 14}),
    # One scale per row: INT4 is always blocked for TensorRT, so the row's scale repeats over blocks of 64.
    "int4-per-channel-tensorrt": ({"format": "int4", "granularity": "per_channel"}, "tensorrt", {"weight_dq": 14}),
    "int4-ort": (INT4_G32, "ort", {"matmul_nbits": 14}),
    "int4-asym-ort": (INT4_G32_ASYM, "ort", {"matmul_nbits": 14}),
    # Per-channel scales repeat per block of 64 (the whole 64-wide row here); int8 codes shifted +128.
    "int4-per-channel-ort": ({"format": "int4", "granularity": "per_channel"}, "ort", {"matmul_nbits": 14}),
    # 8-bit MatMulNBits only with int8 math (accuracy_level 4); with float math int8 weights stay DequantizeLinear.
    "int8-weight-only-ort": ({"format": "int8"}, "ort", {"weight_dq": 14}),
    "int8-weight-only-ort-acc4": ({"format": "int8"}, "ort-acc4", {"matmul_nbits": 14}),
    "int8-asym-g32-ort-acc4": ({"format": "int8", "granularity": "per_group", "group_size": 32, "symmetric": False},
                               "ort-acc4", {"matmul_nbits": 14}),
    "fp8-w8a8-tensorrt": (FP8_STATIC, "tensorrt", {"weight_dq": 14, "activation_qdq": 14}),
    "fp8-block-tensorrt": (FP8_BLOCK, "tensorrt", {"weight_dq": 14}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flavour_matches_quantized_torch(tiny_model_dir, tmp_path, case):
    cfg, flavour, forms = CASES[case]
    h = _quantized(tiny_model_dir, tmp_path, cfg)
    path = tmp_path / "model.onnx"
    flavour, acc = flavour.removesuffix("-acc4"), 4 if flavour.endswith("-acc4") else 0
    assert export_causal_lm(h.model, path, opset=21, flavour=flavour, nbits_accuracy=acc) == forms
    checks = verify_against_torch(h.model, path, cases=((1, 5, 0), (3, 1, 7), (2, 6, 3), (1, 1, 0)),
                                  exact_nbits=True)
    # Measured 1e-7 to 3e-7 (float rounding only): the graph computes from exactly our codes and scales.
    assert max(c["max_rel_error"] for c in checks) < 1e-5, checks
    m = onnx.load(str(path))
    inits = _inits(m)
    # No float copy of a quantized weight: the only large float initializer left is the (tied) embedding.
    floats = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 64 * 64]
    assert [tuple(i.dims) for i in floats] == [(h.config.vocab_size, 64)]
    findings = tensorrt_rules.check_model(m)
    if flavour == "tensorrt":
        assert findings == [], [str(f) for f in findings]
    elif "matmul_nbits" in forms or (cfg.get("activations") and cfg["format"] == "int8"):
        assert findings  # the ort forms (com.microsoft ops, uint8 zero points) are not TensorRT's
    q_proj = h.model.model.layers[0].self_attn.q_proj
    name = "model.layers.0.self_attn.q_proj"
    if "matmul_nbits" in forms:
        node = next(n for n in _nodes(m, "MatMulNBits") if n.name.startswith(name))
        attrs = {a.name: a.i for a in node.attribute}
        bits = 4 if cfg["format"] == "int4" else 8
        block = cfg.get("group_size", 64)
        assert attrs == {"K": 64, "N": 64, "bits": bits, "block_size": block, "accuracy_level": acc}
        b = numpy_helper.to_array(inits[node.input[1]])
        assert b.shape == (64, 64 // block, block * bits // 8) and b.dtype == np.uint8
        ours = q_proj.weight_packed.numpy()
        if bits == 8 and cfg.get("symmetric", True):
            ours = (ours.astype(np.int16) + 128).astype(np.uint8)  # MatMulNBits' default 8-bit zero point
        assert np.array_equal(b.reshape(64, -1), ours)  # our bytes
        assert (len(node.input) == 4) == (not cfg.get("symmetric", True))
        return
    dq = next(n for n in _nodes(m, "DequantizeLinear") if n.name == f"{name}/weight_dq")
    codes = inits[dq.input[0]]
    attrs = {a.name: a.i for a in dq.attribute}
    assert tuple(codes.dims) == (64, 64) and len(dq.input) == 2  # [in, out]; zero point omitted (= 0)
    if cfg["format"] == "int4":
        block = cfg.get("group_size", 64)
        assert codes.data_type == onnx.TensorProto.INT4 and attrs == {"axis": 0, "block_size": block}
        assert tuple(inits[dq.input[1]].dims) == (64 // block, 64)
    elif cfg == FP8_BLOCK:
        assert codes.data_type == onnx.TensorProto.FLOAT8E4M3FN and attrs == {"axis": 0, "block_size": 32}
    else:
        assert attrs == {"axis": 1} and tuple(inits[dq.input[1]].dims) == (64,)
    if "activation_qdq" in forms:
        q = next(n for n in _nodes(m, "QuantizeLinear") if n.name == f"{name}/input_q")
        scale, zp = numpy_helper.to_array(inits[q.input[1]]), numpy_helper.to_array(inits[q.input[2]])
        assert scale.shape == () and scale == pytest.approx(q_proj.input_scale.item())
        if flavour == "ort" and cfg["format"] == "int8":
            assert zp.dtype == np.uint8 and zp == 128  # U8S8: our symmetric grid, shifted
        else:
            assert float(zp.astype(np.float32)) == 0.0


@pytest.mark.parametrize("cfg,flavour,match", [
    (INT4_G32_ASYM, "tensorrt", "asymmetric weights"),
    ({"format": "int8", "activations": {"format": "int8", "dynamic": True}}, "tensorrt", "dynamic int8 activations"),
    ({"format": "fp8", "activations": {"format": "fp8", "dynamic": True}}, "ort", "dynamic fp8 activations"),
    ({"format": "int8", "granularity": "per_group", "group_size": 32}, "tensorrt", "group-wise INT8"),
    ({"format": "nvfp4"}, "ort", "NVFP4"),
])
def test_schemes_a_flavour_cannot_carry_are_refused_naming_the_layer(tiny_model_dir, tmp_path, cfg, flavour, match):
    h = _quantized(tiny_model_dir, tmp_path, cfg)
    from compressor.kernels.qlinear import QuantLinear

    schemes = {n: m.scheme for n, m in h.model.named_modules() if isinstance(m, QuantLinear)}
    with pytest.raises(ValueError, match=match) as e:
        check_lowerable(schemes, flavour)
    assert "model.layers.0.self_attn.q_proj" in str(e.value)
    check_lowerable(schemes, "reference")  # the reference flavour carries everything


# ---- the fused ort graph through the export_onnx pass (compressor.ort_builder) ----

def _export_pass(h, tmp_path, **cfg):
    info = get_pass("export_onnx")
    ctx = RunContext(get_target("cpu"), tmp_path, tmp_path, quiet=True)
    return info.run(h, info.config(**cfg), ctx).info


def test_export_pass_builds_the_fused_ort_graph_by_default(tiny_model_dir, tmp_path):
    h = _quantized(tiny_model_dir, tmp_path, INT4_G32)
    info = _export_pass(h, tmp_path, flavour="ort", opset=21)
    assert info["fused"] is True
    # q/k/v and gate/up packed: 4 MatMulNBits a layer instead of the traced flavour's 7; the tied head stays float.
    assert info["lowered"] == {"matmul_nbits": 8, "matmul": 1, "group_query_attention": 2, "nodes": 37}
    assert max(c["max_rel_error"] for c in info["verification"]) < 1e-5  # measured ~3e-7
    m = onnx.load(str(tmp_path / "onnx-ort" / "model.onnx"))
    assert len(_nodes(m, "GroupQueryAttention")) == 2 and not _nodes(m, "Transpose")


def test_export_pass_fused_w8a8_checks_the_packed_qdq(tiny_model_dir, tmp_path):
    h = _quantized(tiny_model_dir, tmp_path, INT8_STATIC)
    info = _export_pass(h, tmp_path / "a", flavour="ort", opset=21)
    assert info["fused"] and info["lowered"]["activation_qdq"] == 8
    assert info["activation_qdq_checked"] == 14  # every calibrated layer, inside its packed projection
    assert max(c["max_rel_error"] for c in info["verification"]) < 1e-5


def test_export_pass_fused_false_or_other_flavours_trace(tiny_model_dir):
    from compressor.passes.lower.export_onnx import _use_fused

    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    cfg = get_pass("export_onnx").config
    assert _use_fused(h.model, cfg(flavour="ort")) == (True, None)
    assert _use_fused(h.model, cfg(flavour="ort", fused=False)) == (False, None)
    assert _use_fused(h.model, cfg(flavour="reference")) == (False, None)


def _unsupported_handle():
    """A tiny Llama whose heads (8 wide) GroupQueryAttention does not take; the traced graph runs it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.model import ModelHandle

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return ModelHandle(LlamaForCausalLM(cfg).eval(), None, "tiny", "tiny", "0")


def test_export_pass_falls_back_to_tracing_or_refuses_when_asked_for_fused(tmp_path):
    from compressor.errors import PassError

    h = _unsupported_handle()
    info = _export_pass(h, tmp_path / "a", flavour="ort", verify=False)
    assert info["fused"] is False and "head_dim 8" in info["notes"][0]
    assert (tmp_path / "a" / "onnx-ort" / "model.onnx").is_file()
    with pytest.raises(PassError, match="fused: no fused ONNX Runtime graph for this model: head_dim 8") as e:
        _export_pass(h, tmp_path / "b", flavour="ort", fused=True)
    assert e.value.exit_code == 2 and not (tmp_path / "b" / "onnx-ort").exists()


def test_fused_is_refused_for_other_flavours():
    cfg = get_pass("export_onnx").config
    with pytest.raises(ValueError, match="fused: only the ort flavour"):
        cfg(flavour="tensorrt", fused=True)
    assert cfg(flavour="tensorrt").fused is True and cfg(flavour="tensorrt", fused=False)  # default: no effect
