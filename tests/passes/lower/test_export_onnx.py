"""ONNX export: KV cache, dynamic shapes, ONNX Runtime vs torch on untraced shapes, quantized graphs stay small."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compressor.context import RunContext
from compressor.model import load_model
from compressor.onnx_export import export_causal_lm, verify_against_torch
from compressor.recipe import ModelSpec
from compressor.registry import get_pass
from compressor.targets import get_target


@pytest.fixture(scope="module")
def fp32_onnx(tiny_model_dir, tmp_path_factory):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_causal_lm(h.model, path, opset=18)
    return h, path


def test_unquantized_export_matches_torch_on_untraced_shapes(fp32_onnx):
    h, path = fp32_onnx
    checks = verify_against_torch(h.model, path, cases=((1, 5, 0), (3, 1, 7), (2, 9, 2), (1, 1, 0)))
    assert [(c["batch"], c["seq"], c["past"]) for c in checks] == [(1, 5, 0), (3, 1, 7), (2, 9, 2), (1, 1, 0)]
    assert max(c["max_rel_error"] for c in checks) < 1e-4, checks


def test_graph_io_names_and_dynamic_dims(fp32_onnx):
    _, path = fp32_onnx
    m = onnx.load(str(path))
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert ins["input_ids"] == ["batch", "seq"] and ins["attention_mask"] == ["batch", "total_seq"]
    assert ins["past_key_values.0.key"] == ["batch", 2, "past_seq", 16]
    assert outs["present.1.value"] == ["batch", 2, "total_seq", 16]
    assert outs["logits"][:2] == ["batch", "seq"]
    assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {18}


def test_greedy_decode_with_kv_cache_matches_torch(fp32_onnx):
    """Prefill then 5 decode steps feeding present -> past: same tokens as torch's own generate."""
    h, path = fp32_onnx
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prompt = torch.randint(0, h.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = h.model.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    names = [o.name for o in sess.get_outputs()]
    feeds = {"input_ids": prompt.numpy(), "attention_mask": np.ones((1, 7), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, 2, 0, 16), np.float32)
    toks = prompt[0].tolist()
    for _ in range(6):
        res = dict(zip(names, sess.run(None, feeds)))
        nxt = int(res["logits"][0, -1].argmax())
        toks.append(nxt)
        feeds = {"input_ids": np.array([[nxt]]), "attention_mask": np.ones((1, len(toks)), np.int64)}
        feeds.update({n.replace("present", "past_key_values"): v for n, v in res.items() if n.startswith("present")})
    assert toks == ref[0].tolist()


@pytest.mark.parametrize("cfg,opset,packed_type", [
    ({"format": "int8"}, 18, onnx.TensorProto.INT8),
    ({"format": "int4", "granularity": "per_group", "group_size": 32}, 18, onnx.TensorProto.UINT8),
    ({"format": "fp8"}, 21, onnx.TensorProto.FLOAT8E4M3FN),
])
def test_quantized_export_matches_quantized_torch_and_stays_packed(tiny_model_dir, tmp_path, cfg, opset, packed_type):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    info = get_pass("quantize_rtn")
    info.run(h, info.config(**cfg), RunContext(get_target("cpu"), tmp_path, tmp_path, quiet=True))
    path = tmp_path / "q.onnx"
    export_causal_lm(h.model, path, opset=opset)
    checks = verify_against_torch(h.model, path)
    assert max(c["max_rel_error"] for c in checks) < 1e-4, checks
    m = onnx.load(str(path))
    packed = [i for i in m.graph.initializer if i.name.endswith("weight_packed")]
    assert len(packed) == 14 and all(i.data_type == packed_type for i in packed)
    # No float copy of a quantized weight was folded in: the only large float initializer is the embedding.
    floats = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 64 * 64]
    assert [tuple(i.dims) for i in floats] == [(h.config.vocab_size, 64)], [(i.name, i.dims) for i in floats]


def test_fp8_needs_opset_19(tiny_model_dir, tmp_path):
    from compressor.errors import PassError

    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    ctx = RunContext(get_target("cpu"), tmp_path, tmp_path, quiet=True)
    rtn = get_pass("quantize_rtn")
    rtn.run(h, rtn.config(format="fp8"), ctx)
    exp = get_pass("export_onnx")
    with pytest.raises(PassError, match="opset 19"):
        exp.run(h, exp.config(opset=18), ctx)
