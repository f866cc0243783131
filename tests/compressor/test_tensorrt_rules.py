"""The TensorRT rules linter on small hand-built graphs: one compliant W8A8 MatMul, then one graph per rule it
breaks (each finding names the node and the rule), files it cannot check at all, and `compress check-onnx`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.tensorrt_rules import CheckError, Finding, check, check_model, max_opset
from conftest import run_cli

X = helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 64])
Y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 32])


def _init(name, arr, dtype=None):
    """An initializer; dtype for the types numpy has no name for (INT4)."""
    if dtype is None:
        return numpy_helper.from_array(np.asarray(arr), name)
    arr = np.asarray(arr)
    return helper.make_tensor(name, dtype, arr.shape, arr.flatten().tolist())


def _model(nodes, inits, opset=21, inputs=(X,), outputs=(Y,), domains=(), value_info=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits), value_info=list(value_info))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def _act_qdq(scale="x_scale", zp="x_zp", **attrs):
    """X -> QuantizeLinear (q_x) -> DequantizeLinear (dq_x) -> Xd."""
    return [helper.make_node("QuantizeLinear", ["X", scale, zp], ["Xq"], name="q_x", **attrs),
            helper.make_node("DequantizeLinear", ["Xq", scale, zp], ["Xd"], name="dq_x", **attrs)]


def _w8a8(x_zp=None, x_scale=None, weight=None, w_scale=None, w_attrs=None, act=None, extra=(), opset=21):
    """The compliant graph, with any part replaced: X[2,64] -> Q/DQ (int8, zero point 0, one scale) -> MatMul with
    DequantizeLinear(int8 weight [64, 32], per-channel scale on axis 1)."""
    inits = [_init("x_scale", np.float32(0.05) if x_scale is None else x_scale),
             x_zp if x_zp is not None else _init("x_zp", np.int8(0)),
             weight if weight is not None else _init("W", np.arange(64 * 32, dtype=np.int8).reshape(64, 32)),
             _init("w_scale", np.full(32, 0.01, np.float32) if w_scale is None else w_scale)]
    nodes = (act if act is not None else _act_qdq()) + [
        helper.make_node("DequantizeLinear", ["W", "w_scale"], ["Wd"], name="dq_w", **(w_attrs or {"axis": 1})),
        helper.make_node("MatMul", ["Xd", "Wd"], ["Y"], name="matmul")] + list(extra)
    return _model(nodes, inits, opset=opset)


def _found(findings: list[Finding]) -> list[tuple[str, str]]:
    return sorted((f.node, f.rule) for f in findings)


def test_compliant_w8a8_matmul_has_no_findings():
    m = _w8a8()
    onnx.checker.check_model(m, full_check=True)  # a valid graph, so the linter's silence means something
    assert check_model(m) == []


def test_non_zero_zero_point():
    findings = check_model(_w8a8(x_zp=_init("x_zp", np.int8(3))))
    assert _found(findings) == [("dq_x", "zero point"), ("q_x", "zero point")]
    assert "x_zp" in findings[0].message and "symmetric" in findings[0].message


def test_runtime_scale():
    scale_nodes = [helper.make_node("Abs", ["X"], ["xa"], name="abs"),
                   helper.make_node("ReduceMax", ["xa"], ["xmax"], name="amax", keepdims=0),
                   helper.make_node("Div", ["xmax", "c127"], ["x_scale_rt"], name="div")]
    m = _w8a8(act=scale_nodes + _act_qdq(scale="x_scale_rt"))
    m.graph.initializer.append(_init("c127", np.float32(127)))
    findings = check_model(m)
    assert _found(findings) == [("dq_x", "scale"), ("q_x", "scale")]
    assert all("run time" in f.message for f in findings)


def test_per_channel_activation_scale():
    # Per channel on the DequantizeLinear is fine (weights are per channel); on a QuantizeLinear it is not.
    m = _w8a8(x_scale=np.full(64, 0.05, np.float32), x_zp=_init("x_zp", np.zeros(64, np.int8)),
              act=_act_qdq(axis=1))
    findings = check_model(m)
    assert _found(findings) == [("q_x", "scale")]
    assert "64 values" in findings[0].message and "per tensor" in findings[0].message


@pytest.mark.parametrize("node", [
    helper.make_node("Unique", ["X"], ["u"], name="unique"),
    helper.make_node("SequenceConstruct", ["X", "X"], ["s"], name="seq"),
], ids=["Unique", "SequenceConstruct"])
def test_op_outside_the_allow_list(node):
    findings = check_model(_w8a8(extra=[node]))
    assert _found(findings) == [(node.name, "op")]
    assert findings[0].op_type == node.op_type and "allow-list" in findings[0].message


def test_matmulnbits_is_onnx_runtimes_own():
    node = helper.make_node("MatMulNBits", ["X", "B", "B_scale"], ["Y"], name="mm_nbits", domain="com.microsoft",
                            K=64, N=32, bits=4, block_size=32)
    m = _model([node], [_init("B", np.zeros((32, 2, 16), np.uint8)), _init("B_scale", np.ones(64, np.float32))],
               domains=["com.microsoft"])
    findings = check_model(m)
    # The packed uint8 weights it takes break the uint8 rule too.
    assert _found(findings) == [("B", "uint8"), ("mm_nbits", "domain")]
    assert "ONNX Runtime" in next(f for f in findings if f.rule == "domain").message


def test_int4_quantize_linear_is_weight_only():
    m = _w8a8(x_zp=_init("x_zp", np.int64(0), TensorProto.INT4))
    findings = check_model(m)
    # Both Q and DQ of the activation: INT4 activations (weight-only) and no block_size.
    assert _found(findings) == [("dq_x", "int4"), ("dq_x", "int4"), ("q_x", "int4"), ("q_x", "int4")]
    q = [f.message for f in findings if f.node == "q_x"]
    assert any("weight-only" in msg for msg in q) and any("block_size" in msg for msg in q)


def test_int4_weight_without_block_size():
    w = _init("W", np.ones((64, 32), np.int64), TensorProto.INT4)
    findings = check_model(_w8a8(weight=w))
    assert _found(findings) == [("dq_w", "int4")]
    assert "block_size" in findings[0].message


def test_int4_weight_in_blocks_fits():
    w = _init("W", np.ones((64, 32), np.int64), TensorProto.INT4)
    m = _w8a8(weight=w, w_scale=np.full((2, 32), 0.01, np.float32), w_attrs={"axis": 0, "block_size": 32})
    onnx.checker.check_model(m, full_check=True)
    assert check_model(m) == []


def test_int8_weight_in_blocks():
    m = _w8a8(w_scale=np.full((2, 32), 0.01, np.float32), w_attrs={"axis": 0, "block_size": 32})
    findings = check_model(m)
    assert _found(findings) == [("dq_w", "block")]
    assert "INT8" in findings[0].message


def test_block_on_axis_0_of_a_rank_3_tensor():
    w = _init("W", np.ones((4, 64, 32), np.int64), TensorProto.INT4)
    m = _w8a8(weight=w, w_scale=np.full((2, 64, 32), 0.01, np.float32), w_attrs={"axis": 0, "block_size": 2})
    findings = check_model(m)
    assert _found(findings) == [("dq_w", "block")]
    assert "axis 0 of a rank-3" in findings[0].message


def test_uint8_zero_point_in_the_middle_of_the_graph():
    findings = check_model(_w8a8(x_zp=_init("x_zp", np.uint8(0))))
    assert _found(findings) == [("dq_x", "uint8"), ("q_x", "uint8"), ("x_zp", "uint8")]


def test_uint8_at_the_network_input_fits():
    ids = helper.make_tensor_value_info("ids", TensorProto.UINT8, [2, 64])
    m = _model([helper.make_node("Cast", ["ids"], ["Y"], name="cast", to=TensorProto.FLOAT)], [], inputs=[ids])
    assert check_model(m) == []


def test_opset_against_the_tensorrt_version():
    m = _w8a8()
    findings = check_model(m, "10.0")
    assert _found(findings) == [("<graph>", "opset")]
    assert "opset 21" in findings[0].message and "9-20" in findings[0].message
    assert check_model(m, "11.5") == []
    assert check_model(_w8a8(opset=20), "10.0") == []


def test_plugin_node_is_allowed_unknown_domain_is_not():
    moe = helper.make_node("MoE", ["X", "X"], ["moe_out"], name="moe", domain="compressor")
    assert check_model(_w8a8(extra=[moe])) == []
    foo = helper.make_node("MoE", ["X", "X"], ["foo_out"], name="foo", domain="com.example")
    findings = check_model(_w8a8(extra=[foo]))
    assert _found(findings) == [("foo", "domain")]
    assert "com.example" in findings[0].message and "not a standard op" in findings[0].message


def test_max_opset():
    assert max_opset("10.0") == 20
    assert max_opset("10.8") == 20
    assert max_opset("11.0") == 24
    assert max_opset("11.5.1") == 25
    with pytest.raises(CheckError, match="older than"):
        max_opset("9.0")
    with pytest.raises(CheckError, match="not a version number"):
        max_opset("eleven")


# Files that cannot be checked at all.


def _save(m, path):
    onnx.save(m, str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckError, match="no such ONNX file"):
        check(tmp_path / "missing.onnx")


@pytest.mark.parametrize("content", [b"name: not an onnx model\n", b""], ids=["text", "empty"])
def test_non_onnx_file(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(CheckError, match="not .*ONNX model") as e:
        check(path)
    assert str(path) in str(e.value)


def test_external_data_file_deleted(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_w8a8(), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    assert check(path) == []  # with its data it loads and fits
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(CheckError) as e:
        check(path)
    msg = str(e.value)
    assert "weights.bin" in msg and "missing" in msg
    assert any(f"initializer {name} " in msg for name in ("x_scale", "x_zp", "W", "w_scale"))


def test_unparsable_version(tmp_path):
    path = _save(_w8a8(), tmp_path / "model.onnx")
    with pytest.raises(CheckError, match="'latest' is not a version number"):
        check(path, "latest")


# compress check-onnx


def test_cli_compliant_file(tmp_path, capsys):
    path = _save(_w8a8(), tmp_path / "model.onnx")
    rc, out, err = run_cli(["check-onnx", path], capsys)
    assert rc == 0, err
    assert "fits" in out and "11.5" in out


def test_cli_lists_every_offending_node(tmp_path, capsys):
    extra = [helper.make_node("Unique", ["X"], ["u"], name="unique"),
             helper.make_node("Foo", ["X"], ["f"], name="foo", domain="com.example")]
    path = _save(_w8a8(x_zp=_init("x_zp", np.int8(3)), extra=extra), tmp_path / "bad.onnx")
    rc, out, err = run_cli(["check-onnx", path], capsys)
    assert rc == 1
    lines = out.strip().splitlines()
    assert len(lines) == 4
    for node, rule in (("q_x", "zero point"), ("dq_x", "zero point"), ("unique", "op"), ("foo", "domain")):
        assert any(f"node {node} " in line and f"[{rule}]" in line for line in lines), out
    assert "4 finding(s)" in err and "bad.onnx" in err


def test_cli_tensorrt_version(tmp_path, capsys):
    path = _save(_w8a8(), tmp_path / "model.onnx")
    rc, out, _ = run_cli(["check-onnx", path, "--tensorrt-version", "10.0"], capsys)
    assert rc == 1 and "node <graph>" in out and "[opset]" in out
    rc, out, _ = run_cli(["check-onnx", path, "--tensorrt-version", "11.5"], capsys)
    assert rc == 0 and "fits" in out


@pytest.mark.parametrize("content", [None, b"not onnx\n"], ids=["missing", "not-onnx"])
def test_cli_unreadable_file(tmp_path, capsys, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    rc, out, err = run_cli(["check-onnx", path], capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(path) in err
