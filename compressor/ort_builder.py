"""The fused ONNX Runtime graph of a Llama-family decoder, built directly from the config and the weights.

The traced ort flavour runs ~2100 nodes per decode step on SmolLM2 (RMSNorm as six ops, RoPE, KV Concat, the
repeat_kv Expand, Transposes): about half of an FP32 step, a part that no weight format shrinks. This builder
writes the graph ONNX Runtime's own model builder would, from ORT's fused contrib ops, ~10 nodes a layer:

  SimplifiedLayerNormalization (layer 0) / com.microsoft SkipSimplifiedLayerNormalization (the residual add and
  the next norm in one node), one QKV projection (q/k/v concatenated along N: exact, every scale and zero point
  belongs to one output column), com.microsoft GroupQueryAttention (RoPE inside from cos/sin caches computed
  from the model's rotary inv_freq, KV cache in BNSH, causal), o_proj, gate/up concatenated + Split +
  QuickGelu(alpha=1) (= SiLU) * up, down_proj; the final norm; lm_head.

Linear layers take the ort flavour's forms (compressor.onnx_lowering, reused, not copied): INT4/INT8 weight-only
as MatMulNBits from our codes and scales, W8A8 static as U8S8 QDQ, float layers as MatMul with the [in, out]
weight; a float lm_head is a Gemm(transB=1) on the [vocab, hidden] weight, so a tied head shares the embedding.
Layers are concatenated (QKV, gate/up) when they have one form (`concat_linears`; W8A8 layers also need one
calibrated input scale, which q/k/v and gate/up have, as they read the same input); otherwise each runs on its
own and GQA takes q, k and v separately. `static_activation_layers` names the activation Q/DQ pairs as the graph
does, for onnx_lowering.check_activation_qdq.

Interface: the traced export's (compressor.onnx_export.io_names). seqlens_k = sum(attention_mask) - 1 and
total_sequence_length = attention_mask's width: the mask must be all ones or right-padded (left padding is not
supported: GroupQueryAttention takes each row's valid keys as a prefix of the cache). Computation in float32.

Supported: LlamaForCausalLM and same-shaped models (Qwen2, Mistral) with full causal attention, default RoPE,
SiLU MLP, RMSNorm; `unsupported_reason` says why another model is not.
"""

from __future__ import annotations

from pathlib import Path

from compressor.onnx_lowering import _Builder, _activation_qdq, _matmul_nbits, _nbits_block, _weight_dq

MODEL_TYPES = ("llama", "qwen2", "mistral")
MS = "com.microsoft"


def unsupported_reason(model) -> str | None:
    """Why `model` has no fused graph (None when it has one)."""
    return _config_reason(model) or next(filter(None, (_layer_reason(model, i) for i in range(
        len(model.model.layers)))), None)


def _config_reason(model) -> str | None:
    import torch

    from compressor.kernels.qlinear import QuantLinear

    cfg = model.config
    if cfg.model_type not in MODEL_TYPES:
        return f"model type {cfg.model_type!r} (fused graphs cover {', '.join(MODEL_TYPES)})"
    if getattr(getattr(model, "model", None), "layers", None) is None \
            or type(getattr(model, "lm_head", None)) not in (torch.nn.Linear, QuantLinear):
        return "no model.layers, or an lm_head that is not Linear or QuantLinear"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (only silu)"
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        return f"layer types {sorted(types)} (only full causal attention)"
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "mistral" and window is not None and window < cfg.max_position_embeddings:
        return f"sliding_window {window} (only full causal attention)"
    rot = getattr(model.model, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return "no model.rotary_emb with inv_freq"
    if getattr(rot, "rope_type", "default") != "default" or float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
        return f"rope_type {getattr(rot, 'rope_type', None)!r} (only the default RoPE)"
    if _dims(cfg)[2] % 16:
        return f"head_dim {_dims(cfg)[2]} (GroupQueryAttention needs a multiple of 16)"
    if rot.inv_freq.numel() * 2 != _dims(cfg)[2]:
        return f"partial rotary ({rot.inv_freq.numel() * 2} of {_dims(cfg)[2]} dims)"
    if getattr(cfg, "compressor_kv_cache", None):
        return "a quantized KV cache (kv_cache_fp8): the fused graph keeps a float cache"
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if impl not in ("eager", "sdpa"):
        return f"attention implementation {impl!r} (eager or sdpa only)"
    if next(model.parameters()).dtype != torch.float32:
        return f"dtype {next(model.parameters()).dtype} (fused graphs compute in float32)"
    return None


def _layer_reason(model, i: int) -> str | None:
    import torch

    from compressor.kernels.qlinear import QuantLinear

    heads, kv_heads, head_dim = _dims(model.config)
    layer = model.model.layers[i]
    want = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for part, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj",
                                                                                 "down_proj"))):
        for n in names:
            mod = getattr(part, n, None)
            if type(mod) not in (torch.nn.Linear, QuantLinear):
                return f"model.layers.{i}: {n} is {type(mod).__name__}, not Linear or QuantLinear"
            if n in want and mod.out_features != want[n]:
                return f"model.layers.{i}.self_attn.{n}: {mod.out_features} outputs, the config says {want[n]}"
    for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
        if not type(norm).__name__.endswith("RMSNorm"):
            return f"model.layers.{i}: {type(norm).__name__} is not an RMSNorm"
    if abs(float(getattr(attn, "scaling", head_dim ** -0.5)) - head_dim ** -0.5) > 1e-12:
        return f"model.layers.{i}: attention scaling {attn.scaling} != head_dim ** -0.5"
    return None


def _dims(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv_heads, head_dim


class _Appender(_Builder):
    """onnx_lowering's builder, appending to the graph instead of inserting before an anchor node."""

    def __init__(self, graph, prefix: str, counts: dict, names: set | None = None):
        super().__init__(graph, None, prefix)
        self.counts, self.names = counts, set() if names is None else names

    def at(self, prefix: str) -> "_Appender":
        return _Appender(self.graph, prefix, self.counts, self.names)

    def node(self, op: str, inputs, attrs=None, domain: str = "", name: str = "", outputs: int = 1):
        import onnx_ir as ir

        base = unique = f"{self.prefix}/{name or op}"
        k = 0
        while unique in self.names:  # node names are unique in a valid graph
            k += 1
            unique = f"{base}_{k}"
        self.names.add(unique)
        n = ir.node(op, inputs, attributes=attrs or {}, domain=domain, name=unique, num_outputs=outputs)
        self.graph.append(n)
        return n.outputs[0] if outputs == 1 else list(n.outputs)

    def count(self, form: str) -> None:
        self.counts[form] = self.counts.get(form, 0) + 1


# ---- linear layers ----

def concat_linears(mods):
    """One layer computing `mods` (same input) side by side along the outputs, or None when they have no common
    form: all float nn.Linear, or all QuantLinear of one INT4/INT8 scheme with per-row or per-group weight scales
    and, if they quantize activations, one static input scale (q/k/v and gate/up are calibrated on the same
    input, so theirs are equal). Exact: each output column keeps its own codes, scales and zero points."""
    import torch

    from compressor.kernels.qlinear import QuantLinear

    first = mods[0]
    if any(m.in_features != first.in_features for m in mods) or len({m.bias is None for m in mods}) != 1:
        return None
    bias = None if first.bias is None else torch.cat([m.bias.detach().float() for m in mods])
    out = sum(m.out_features for m in mods)
    if all(type(m) is torch.nn.Linear for m in mods):
        lin = torch.nn.Linear(first.in_features, out, bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.cat([m.weight.detach().float() for m in mods]))
            if bias is not None:
                lin.bias.copy_(bias)
        return lin
    if not all(type(m) is QuantLinear for m in mods) or len({str(m.scheme) for m in mods}) != 1 \
            or first.fmt not in ("int4", "int8") or any(m.weight_scale.shape[0] != m.out_features for m in mods):
        return None
    if first.activations is not None and (first.input_scale is None or any(
            m.input_scale is None or not torch.equal(m.input_scale, first.input_scale) for m in mods)):
        return None
    q = QuantLinear(first.in_features, out, fmt=first.fmt, group_size=first.group_size, symmetric=first.symmetric,
                    bias=bias is not None, activations=first.activations)
    with torch.no_grad():
        q.weight_packed = torch.cat([m.weight_packed for m in mods])
        q.weight_scale = torch.cat([m.weight_scale for m in mods])
        if not first.symmetric:
            q.weight_zero_point = torch.cat([m.weight_zero_point for m in mods])
        if first.input_scale is not None:
            q.input_scale.copy_(first.input_scale)
        if bias is not None:
            q.bias.copy_(bias)
    return q


def projections(prefix: str, mods: dict, fused_name: str) -> list[tuple[str, object]]:
    """The layers the graph computes for `mods` ({name: layer} reading one input) under `prefix`:
    [(prefix.fused_name, the concatenated layer)] when `concat_linears` finds a common form, else each as it is."""
    fused = concat_linears(list(mods.values()))
    if fused is None:
        return [(f"{prefix}.{n}", m) for n, m in mods.items()]
    return [(f"{prefix}.{fused_name}", fused)]


def _layer_groups(model, i: int) -> dict[str, list[tuple[str, object]]]:
    """Layer i's projections as the graph computes them: qkv, o, gate_up, down -> [(name, layer)]."""
    layer, p = model.model.layers[i], f"model.layers.{i}"
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv": projections(f"{p}.self_attn", {"q_proj": attn.q_proj, "k_proj": attn.k_proj,
                                                    "v_proj": attn.v_proj}, "qkv_proj"),
            "o": [(f"{p}.self_attn.o_proj", attn.o_proj)],
            "gate_up": projections(f"{p}.mlp", {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}, "gate_up_proj"),
            "down": [(f"{p}.mlp.down_proj", mlp.down_proj)]}


def static_activation_layers(model) -> dict:
    """{name: QuantLinear} of the layers with a calibrated input scale as the fused graph names them (q/k/v and
    gate/up concatenated where they share it), for compressor.onnx_lowering.check_activation_qdq."""
    from compressor.kernels.qlinear import QuantLinear

    out = {}
    for i in range(len(model.model.layers)):
        for group in _layer_groups(model, i).values():
            out.update({n: m for n, m in group if isinstance(m, QuantLinear) and m.input_scale is not None})
    head = model.lm_head
    if isinstance(head, QuantLinear) and head.input_scale is not None:
        out["lm_head"] = head
    return out


def emit_linear(b: _Appender, mod, x, accuracy_level: int):
    """y = mod(x) in the ort flavour's form for `mod` (nn.Linear or QuantLinear); nodes named after b.prefix."""
    import numpy as np
    import torch

    from compressor.kernels.qlinear import QuantLinear
    from compressor.onnx_lowering import check_lowerable

    if isinstance(mod, QuantLinear):
        check_lowerable({b.prefix: mod.scheme}, "ort")
        block = _nbits_block(mod, accuracy_level)
        if block:
            y = _matmul_nbits(b, mod, x, block, accuracy_level)
            b.count("matmul_nbits")
        else:
            w = _weight_dq(b, mod)
            if mod.activations is not None:
                x = _activation_qdq(b, mod, x, "ort")
                b.count("activation_qdq")
            y = b.node("MatMul", [x, w])
            b.count("weight_dq")
    elif isinstance(mod, torch.nn.Linear):
        w = mod.weight.detach().float().numpy()
        y = b.node("MatMul", [x, b.const("weight", np.ascontiguousarray(w.T))])
        b.count("matmul")
    else:
        raise TypeError(f"{b.prefix}: {type(mod).__name__} is not a linear layer")
    if mod.bias is not None:
        y = b.node("Add", [y, b.const("bias", mod.bias.detach().float().numpy())], name="bias")
    return y


def emit_group(b: _Appender, group: list[tuple[str, object]], x, accuracy_level: int, sizes=None) -> list:
    """Outputs of `group` (from `projections`) on x. A concatenated layer's output is Split by `sizes` when
    given, else returned whole ([y])."""
    import numpy as np

    ys = [emit_linear(b.at(name), mod, x, accuracy_level) for name, mod in group]
    if len(group) == 1 and sizes is not None and len(sizes) > 1:
        s = b.at(group[0][0])
        return s.node("Split", [ys[0], s.const("split", np.array(sizes, dtype=np.int64))], {"axis": -1},
                      outputs=len(sizes))
    return ys


# ---- the graph ----

def _rope_caches(model):
    """cos/sin [max_position_embeddings, head_dim / 2] as the model's rotary embedding computes them (float32)."""
    import torch

    rot = model.model.rotary_emb
    pos = torch.arange(model.config.max_position_embeddings, dtype=torch.float32)
    freqs = pos[:, None] * rot.inv_freq.float()[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


def _norm_eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def build(model, accuracy_level: int = 0, opset: int = 21):
    """The fused graph of `model` as an onnx_ir Model. -> (model, counts {form: n})."""
    import numpy as np
    import onnx_ir as ir

    from compressor.onnx_export import io_names

    why = unsupported_reason(model)
    if why:
        raise ValueError(f"no fused ONNX Runtime graph for this model: {why}")
    cfg = model.config
    _, kv_heads, head_dim = _dims(cfg)
    n_layers = len(model.model.layers)
    ins, outs = io_names(n_layers)
    f32, i64 = ir.TensorType(ir.DataType.FLOAT), ir.TensorType(ir.DataType.INT64)
    inputs = [ir.Value(name=ins[0], shape=ir.Shape(["batch", "seq"]), type=i64),
              ir.Value(name=ins[1], shape=ir.Shape(["batch", "total_seq"]), type=i64)]
    inputs += [ir.Value(name=n, shape=ir.Shape(["batch", kv_heads, "past_seq", head_dim]), type=f32) for n in ins[2:]]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": opset, MS: 1}, name="compressor_fused")
    counts: dict[str, int] = {}
    b = _Appender(graph, "model", counts)

    # Shared: sequence lengths for GroupQueryAttention, RoPE caches, the embedding.
    ids, mask = inputs[0], inputs[1]
    g = b.at("model.attention_mask")
    one = g.const("one", np.array(1, dtype=np.int64))
    lens = g.node("ReduceSum", [mask, g.const("axis", np.array([1], dtype=np.int64))], {"keepdims": 0})
    seqlens_k = g.node("Cast", [g.node("Sub", [lens, one])], {"to": ir.DataType.INT32}, name="seqlens_k")
    width = g.node("Gather", [g.node("Shape", [mask]), one], {"axis": 0})
    total = g.node("Cast", [width], {"to": ir.DataType.INT32}, name="total_sequence_length")
    # query_seqlens = min(seq, seqlens_k + 1), GroupQueryAttention's own default; given explicitly, it lifts the
    # kernel's batch-1 limit on multi-token steps with a cache (a prefill continuing a batch of prompts)
    seq = g.node("Gather", [g.node("Shape", [ids]), one], {"axis": 0})
    query_lens = g.node("Cast", [g.node("Min", [lens, seq])], {"to": ir.DataType.INT32}, name="query_seqlens")
    cos, sin = _rope_caches(model)
    r = b.at("model.rotary_emb")
    cos, sin = r.const("cos_cache", cos), r.const("sin_cache", sin)
    emb = model.model.embed_tokens
    e = b.at("model.embed_tokens")
    table = e.const("weight", emb.weight.detach().float().numpy())
    h = e.node("Gather", [table, ids], {"axis": 0})

    residual, present = None, []
    for i in range(n_layers):
        h, residual, pk, pv = _decoder_layer(b, model, i, h, residual, [inputs[2 + 2 * i], inputs[3 + 2 * i]],
                                             [seqlens_k, total, cos, sin, query_lens], accuracy_level)
        pk.name, pv.name = outs[1 + 2 * i], outs[2 + 2 * i]
        present += [pk, pv]

    ln = model.model.norm
    w = b.at("model.norm")
    x = w.node("SkipSimplifiedLayerNormalization", [h, residual, w.const("weight", ln.weight.detach().float().numpy())],
               {"epsilon": _norm_eps(ln)}, domain=MS, outputs=4)[0]
    logits = _lm_head(b.at("lm_head"), model, x, ids, table, accuracy_level)
    logits.name = outs[0]
    graph.outputs.extend([logits, *present])
    for v in graph.outputs:  # the traced graph's output shapes (compressor.onnx_export._name_dims)
        v.type = f32
        v.shape = ir.Shape(["batch", "seq", model.lm_head.out_features] if v is logits
                           else ["batch", kv_heads, "total_seq", head_dim])
    counts["nodes"] = len(graph)
    return ir.Model(graph, ir_version=10, producer_name="compressor"), counts


def _decoder_layer(b: _Appender, model, i: int, h, residual, past: list, attn_ins: list, accuracy_level: int):
    """Layer i on the hidden state h (the last layer's output before its residual add; the embedding for layer
    0, with residual None). attn_ins: seqlens_k, total_sequence_length, cos and sin caches, query_seqlens.
    -> (MLP output, residual sum, present key, present value)."""
    layer, p = model.model.layers[i], f"model.layers.{i}"
    heads, kv_heads, head_dim = _dims(model.config)
    ln = layer.input_layernorm
    w = b.at(f"{p}.input_layernorm")
    gamma = w.const("weight", ln.weight.detach().float().numpy())
    if residual is None:
        x = w.node("SimplifiedLayerNormalization", [h, gamma], {"epsilon": _norm_eps(ln), "axis": -1})
        residual = h
    else:  # residual + h, and the norm of it, in one node
        x, _, _, residual = w.node("SkipSimplifiedLayerNormalization", [h, residual, gamma],
                                   {"epsilon": _norm_eps(ln)}, domain=MS, outputs=4)
    groups = _layer_groups(model, i)
    A = b.at(f"{p}.self_attn")
    qkv = emit_group(A, groups["qkv"], x, accuracy_level)  # packed QKV: GroupQueryAttention splits it itself
    qkv += [None] * (3 - len(qkv))
    seqlens_k, total, cos, sin, query_lens = attn_ins
    o, pk, pv = A.node("GroupQueryAttention", [*qkv, *past, seqlens_k, total, cos, sin] + [None] * 7 + [query_lens],
                       {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1, "rotary_interleaved": 0,
                        "scale": float(head_dim ** -0.5)}, domain=MS, outputs=3)
    b.count("group_query_attention")
    h = emit_group(A, groups["o"], o, accuracy_level)[0]

    ln = layer.post_attention_layernorm
    w = b.at(f"{p}.post_attention_layernorm")
    x, _, _, residual = w.node("SkipSimplifiedLayerNormalization",
                               [h, residual, w.const("weight", ln.weight.detach().float().numpy())],
                               {"epsilon": _norm_eps(ln)}, domain=MS, outputs=4)
    M = b.at(f"{p}.mlp")
    inter = layer.mlp.gate_proj.out_features
    gate, up = emit_group(M, groups["gate_up"], x, accuracy_level, sizes=[inter, inter])
    act = M.node("Mul", [M.node("QuickGelu", [gate], {"alpha": 1.0}, domain=MS, name="silu"), up], name="gated")
    return emit_group(M, groups["down"], act, accuracy_level)[0], residual, pk, pv


def _lm_head(b: _Appender, model, x, ids, table, accuracy_level: int):
    """Logits [batch, seq, vocab]. A float head is Gemm(transB=1) on its [vocab, hidden] weight (the embedding's
    own initializer when tied, so the file holds it once); a quantized one takes the ort flavour's form."""
    import numpy as np
    import torch

    head = model.lm_head
    if type(head) is not torch.nn.Linear:
        return emit_linear(b, head, x, accuracy_level)
    tied = head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    w = table if tied else b.const("weight", head.weight.detach().float().numpy())
    hidden = head.in_features
    flat = b.node("Reshape", [x, b.const("rows", np.array([-1, hidden], dtype=np.int64))])
    ins = [flat, w] + ([b.const("bias", head.bias.detach().float().numpy())] if head.bias is not None else [])
    y = b.node("Gemm", ins, {"transB": 1})
    b.count("matmul")
    shape = b.node("Concat", [b.node("Shape", [ids]), b.const("vocab", np.array([head.out_features], np.int64))],
                   {"axis": 0})
    return b.node("Reshape", [y, shape], name="logits")


def export_fused(model, path: str | Path, accuracy_level: int = 0, opset: int = 21,
                 metadata: dict[str, str] | None = None) -> dict:
    """Build the fused graph of `model` and save it to `path` (with `metadata` as metadata_props).
    -> {form: count}."""
    import onnx_ir as ir

    ir_model, counts = build(model, accuracy_level, opset)
    ir_model.metadata_props.update(metadata or {})
    size = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    path = Path(path)
    if size > 1.8e9:  # protobuf's hard limit is 2 GiB
        ir.save(ir_model, path, external_data=path.name + ".data")
    else:
        ir.save(ir_model, path)
    return counts
