"""The fused ONNX Runtime graph (compressor.ort_builder): GroupQueryAttention, SkipSimplifiedLayerNormalization
and packed QKV / gate-up projections, against torch on shapes no graph was built for, and its node budget."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.context import RunContext
from compressor.model import load_model
from compressor.onnx_export import export_causal_lm, verify_against_torch
from compressor.onnx_lowering import check_activation_qdq
from compressor.ort_builder import concat_linears, export_fused, unsupported_reason
from compressor.ort_builder import static_activation_layers as builder_static_layers
from compressor.recipe import ModelSpec
from compressor.registry import get_pass
from compressor.targets import get_target

# Untraced (batch, seq, past): a prefill with an empty cache, batched decode, a batched multi-token step on a
# cache (GroupQueryAttention needs query_seqlens for it), single-token prefill.
SHAPES = ((1, 5, 0), (3, 1, 7), (2, 6, 3), (1, 1, 0))
INT4_G32 = {"format": "int4", "granularity": "per_group", "group_size": 32}
W8A8 = {"format": "int8", "activations": {"format": "int8", "dynamic": False}}


def _quantized(model_dir, tmp_path, cfg):
    h = load_model(ModelSpec(source=str(model_dir)))
    if cfg is not None:
        calib = torch.randint(0, h.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        ctx = RunContext(get_target("cpu"), tmp_path, tmp_path, quiet=True, calibration=lambda: calib)
        rtn = get_pass("quantize_rtn")
        rtn.run(h, rtn.config(**cfg), ctx)
    return h


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


# The tiny Llama: 2 layers, hidden 64, 4 heads / 2 KV heads of 16, MLP 128, vocab tied.
# Shared nodes: Gather (embedding), attention_mask -> ReduceSum, Sub, Cast (seqlens_k), Shape, Gather, Cast
# (total_sequence_length), Shape, Gather, Min, Cast (query_seqlens), final SkipSimplifiedLayerNormalization, lm_head
# Gemm + Reshape x2 + Shape + Concat: 17. Per layer: two norms, QKV, GroupQueryAttention, o_proj, gate_up, Split,
# QuickGelu, Mul, down: 10.
PER_LAYER, SHARED = 10, 17


@pytest.mark.parametrize("case,cfg,acc,form", [
    ("fp32", None, 0, "matmul"),
    ("int4-g32", INT4_G32, 0, "matmul_nbits"),
    ("int4-g32-asym", {**INT4_G32, "symmetric": False}, 0, "matmul_nbits"),
    ("int4-per-channel", {"format": "int4", "granularity": "per_channel"}, 0, "matmul_nbits"),
    ("int8-acc4", {"format": "int8"}, 4, "matmul_nbits"),
])
def test_fused_graph_matches_torch_with_ten_nodes_a_layer(tiny_model_dir, tmp_path, case, cfg, acc, form):
    h = _quantized(tiny_model_dir, tmp_path, cfg)
    path = tmp_path / "fused.onnx"
    counts = export_fused(h.model, path, accuracy_level=acc)
    n_layers = h.config.num_hidden_layers
    # q/k/v packed into one projection and gate/up into another: 4 weight matmuls a layer; the tied float lm_head
    # is one Gemm on the embedding's own initializer.
    assert counts == {form: 4 * n_layers + (form == "matmul"), **({"matmul": 1} if form != "matmul" else {}),
                      "group_query_attention": n_layers, "nodes": PER_LAYER * n_layers + SHARED}
    ops = _ops(path)
    assert ops["GroupQueryAttention"] == n_layers and ops["SimplifiedLayerNormalization"] == 1
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * n_layers  # post-attention, next input norm, final norm
    assert ops["Gemm"] == 1 and ops["Split"] == ops["QuickGelu"] == n_layers
    assert not {"Transpose", "Expand", "Softmax", "Pow", "Sqrt", "Neg", "Slice"} & set(ops)
    # exact_nbits: MatMulNBits with float math. Measured 2.6e-7 to 4.5e-7 (float rounding only).
    checks = verify_against_torch(h.model, path, cases=SHAPES, exact_nbits=True)
    assert max(c["max_rel_error"] for c in checks) < 1e-5, checks
    m = onnx.load(str(path))
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: (a.i if a.type == onnx.AttributeProto.INT else a.f) for a in gqa.attribute}
    assert attrs == {"num_heads": 4, "kv_num_heads": 2, "do_rotary": 1, "rotary_interleaved": 0,
                     "scale": pytest.approx(0.25)}
    assert list(gqa.input[1:3]) == ["", ""]  # packed QKV
    inits = {t.name: t for t in m.graph.initializer}
    cos = numpy_helper.to_array(inits[gqa.input[7]])
    assert cos.shape == (h.config.max_position_embeddings, 8)
    if form == "matmul_nbits":
        node = next(n for n in m.graph.node if n.name == "model.layers.0.self_attn.qkv_proj/matmul_nbits")
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["N"] == 64 + 32 + 32 and attrs["K"] == 64 and attrs["accuracy_level"] == acc
        attn = h.model.model.layers[0].self_attn
        ours = torch.cat([attn.q_proj.weight_packed, attn.k_proj.weight_packed, attn.v_proj.weight_packed]).numpy()
        if cfg["format"] == "int8":
            ours = (ours.astype(np.int16) + 128).astype(np.uint8)  # MatMulNBits' default 8-bit zero point
        assert np.array_equal(numpy_helper.to_array(inits[node.input[1]]).reshape(128, -1), ours)  # our bytes


def test_w8a8_packs_layers_that_share_their_input_scale(tiny_model_dir, tmp_path):
    h = _quantized(tiny_model_dir, tmp_path, W8A8)
    attn = h.model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.input_scale, attn.v_proj.input_scale)  # calibrated on the same input
    path = tmp_path / "fused.onnx"
    counts = export_fused(h.model, path)
    assert counts["activation_qdq"] == counts["weight_dq"] == 4 * 2  # qkv, o, gate_up, down x 2 layers
    m = onnx.load(str(path))
    static = builder_static_layers(h.model)
    assert sorted(static)[:4] == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_up_proj",
                                  "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.qkv_proj"]
    assert check_activation_qdq(m, static) == []  # one Q/DQ pair per packed layer, on the shared scale
    checks = verify_against_torch(h.model, path, cases=SHAPES, bypass_activations=True)
    assert max(c["max_rel_error"] for c in checks) < 1e-5, checks
    # One input scale apart: q/k/v stay three QDQ layers under their own names, GQA takes them separately.
    with torch.no_grad():
        attn.k_proj.input_scale.mul_(1.5)
    counts = export_fused(h.model, path)
    assert counts["activation_qdq"] == 4 * 2 + 2
    m = onnx.load(str(path))
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    assert all(gqa.input[:3])
    assert "model.layers.0.self_attn.k_proj" in builder_static_layers(h.model)
    assert check_activation_qdq(m, builder_static_layers(h.model)) == []


def test_mixed_formats_run_unpacked(tiny_model_dir, tmp_path):
    """k_proj/v_proj and up_proj left float next to INT4 q_proj/gate_proj: nothing to concatenate."""
    h = _quantized(tiny_model_dir, tmp_path, {**INT4_G32, "ignore": ["lm_head", "*k_proj", "*v_proj", "*up_proj"]})
    attn = h.model.model.layers[0].self_attn
    assert concat_linears([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    path = tmp_path / "fused.onnx"
    counts = export_fused(h.model, path)
    assert counts["matmul_nbits"] == 4 * 2 and counts["matmul"] == 3 * 2 + 1  # q, o, gate, down | k, v, up
    ops = _ops(path)
    assert ops["Split"] == 0 and ops["MatMulNBits"] == 8
    checks = verify_against_torch(h.model, path, cases=SHAPES, exact_nbits=True)
    assert max(c["max_rel_error"] for c in checks) < 1e-5, checks


def _tiny(kind: str, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**base, **kw})).eval()


def test_qwen2_biases_and_untied_head(tmp_path):
    model = _tiny("qwen2", use_sliding_window=False)
    with torch.no_grad():  # q/k/v biases of a fresh model are zero; make them count
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    assert unsupported_reason(model) is None
    path = tmp_path / "qwen2.onnx"
    export_causal_lm(model, path, flavour="ort", fused=True)
    ops = _ops(path)
    assert ops["Add"] == 2 and ops["Gemm"] == 1  # the packed q/k/v bias, once a layer; the head's own weight
    checks = verify_against_torch(model, path, cases=SHAPES)
    assert max(c["max_rel_error"] for c in checks) < 1e-5, checks


@pytest.mark.parametrize("kind,kw,why", [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ("mistral", {"sliding_window": 16}, "sliding_window 16"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("mixtral", {}, "model type 'mixtral'"),
    ("llama", {"hidden_size": 32}, "head_dim 8"),
])
def test_models_without_a_fused_graph_are_named(tmp_path, kind, kw, why):
    model = _tiny(kind, **kw)
    assert why in unsupported_reason(model)
    with pytest.raises(ValueError, match="no fused ONNX Runtime graph for this model: " + why):
        export_causal_lm(model, tmp_path / "x.onnx", flavour="ort", fused=True)
    assert not (tmp_path / "x.onnx").exists()


def test_mistral_without_sliding_window_is_supported():
    assert unsupported_reason(_tiny("mistral", sliding_window=None)) is None


def test_fused_is_for_the_ort_flavour_only(tiny_model_dir, tmp_path):
    h = _quantized(tiny_model_dir, tmp_path, None)
    with pytest.raises(ValueError, match="ort flavour only"):
        export_causal_lm(h.model, tmp_path / "x.onnx", flavour="tensorrt", fused=True)


@pytest.fixture(scope="module")
def fp32_fused(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    h = _quantized(tiny_model_dir, tmp, None)
    export_fused(h.model, tmp / "model.onnx", opset=18)
    return h, tmp / "model.onnx"


def test_same_interface_as_the_traced_graph(fp32_fused):
    from compressor.onnx_export import io_names

    m = onnx.load(str(fp32_fused[1]))
    shape = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
             for v in [*m.graph.input, *m.graph.output]}
    assert ([i.name for i in m.graph.input], [o.name for o in m.graph.output]) == io_names(2)
    assert shape["input_ids"] == ["batch", "seq"] and shape["attention_mask"] == ["batch", "total_seq"]
    assert shape["past_key_values.1.value"] == ["batch", 2, "past_seq", 16]
    assert shape["present.0.key"] == ["batch", 2, "total_seq", 16] and shape["logits"] == ["batch", "seq", 320]
    assert {o.domain: o.version for o in m.opset_import} == {"": 18, "com.microsoft": 1}


def test_right_padded_batch_then_decode_matches_torch(fp32_fused):
    """Row 1 holds 4 of 6 tokens (right padding): its valid logits, then one decode step on the graph's own
    present cache, equal torch's. (Left padding is not supported: GroupQueryAttention reads a row's keys as a
    prefix of the cache.)"""
    import onnxruntime as ort

    from compressor.onnx_export import _wrapper

    h, path = fp32_fused
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wrapper = _wrapper(h.model)
    ids = torch.randint(0, h.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    empty = [torch.zeros(2, 2, 0, 16) for _ in range(4)]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             **{n: t.numpy() for n, t in zip(names[1:], empty)}}
    feeds = {k.replace("present", "past_key_values"): v for k, v in feeds.items()}
    res = dict(zip(names, sess.run(None, feeds)))
    with torch.no_grad():
        ref = wrapper(ids, mask, *empty)
    assert np.abs(res["logits"][0] - ref[0][0].numpy()).max() < 1e-5
    assert np.abs(res["logits"][1, :4] - ref[0][1, :4].numpy()).max() < 1e-5
    nxt = torch.tensor([[5], [7]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    feeds = {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(),
             **{n.replace("present", "past_key_values"): v for n, v in res.items() if n.startswith("present")}}
    got = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = wrapper(nxt, mask2, *ref[1:])[0].numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
