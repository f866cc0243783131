"""Lowering quantized linears into the ONNX forms a runtime executes: the export flavours.

The model is traced with each QuantLinear replaced by a float placeholder (`float_placeholders`), so the
exporter sees an ordinary MatMul reading `Transpose(<layer>.weight)`. `lower_linears` then swaps that weight
for our stored codes and scales in the form the flavour asks for:

  tensorrt  explicit quantization TensorRT accepts: DequantizeLinear on the weight, laid out [in, out]
            (INT8/FP8 per-tensor or per-channel, axis 1; INT4/FP8 blocks along the input axis 0, opset 21,
            INT4 packed two per byte), zero points omitted (= constant 0), and for static activations a
            QuantizeLinear/DequantizeLinear pair on the MatMul input with an INT8 or FP8 zero point of 0.
  ort       what ONNX Runtime's CPU kernels run fast: INT4 weights as com.microsoft MatMulNBits (our packed
            bytes as they are; symmetric codes are stored +8, which is MatMulNBits' default zero point), INT8
            W8A8 as U8S8 QDQ (activations uint8 with zero point 128 on our scale: the same grid as our
            symmetric INT8, so nothing is re-quantized), FP8 as QDQ (exact, no speed-up).

Nothing is re-quantized: every code and scale is the QuantLinear's own. What a flavour cannot express is
refused by `check_lowerable` with the layer and the reason, before any export work.
"""

from __future__ import annotations

from contextlib import contextmanager

FLAVOURS = ("reference", "tensorrt", "ort")


def _problem(scheme: dict, flavour: str) -> str | None:
    fmt, act = scheme["format"], scheme.get("activations")
    if flavour == "reference":
        return None
    if fmt == "nvfp4":
        return ("NVFP4 weights have no ONNX lowering yet (ONNX Runtime has no FP4 DequantizeLinear); "
                "export the checkpoint instead")
    if act is not None and act.get("dynamic", True):
        return (f"dynamic {act['format']} activations have no QDQ form with constant scales; calibrate static "
                f"scales (activations: {{format: {act['format']}, dynamic: false}})")
    if flavour == "tensorrt":
        if not scheme["symmetric"]:
            return "asymmetric weights: TensorRT needs zero points of 0 (use symmetric: true)"
        if fmt == "int8" and scheme["group_size"] > 0:
            return "group-wise INT8 weights: TensorRT takes INT8 per-tensor or per-channel scales only"
    return None


def check_lowerable(schemes: dict[str, dict], flavour: str) -> None:
    """Raise ValueError naming the first layer whose scheme `flavour` cannot carry."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown ONNX flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    for name, scheme in schemes.items():
        why = _problem(scheme, flavour)
        if why:
            raise ValueError(f"layer {name}: the {flavour} flavour cannot carry this scheme: {why}")


@contextmanager
def float_placeholders(model, skip: tuple[str, ...] = ()):
    """Temporarily replace every QuantLinear (except those under the module names in `skip`) with an nn.Linear
    holding its dequantized weight. Yields {qualified name: QuantLinear}; the QuantLinears are put back on exit."""
    import torch
    from torch import nn

    from compressor.kernels.qlinear import QuantLinear

    swapped: dict[str, QuantLinear] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear) or any(name.startswith(f"{b}.") for b in skip):
            continue
        w = mod.dequantized_weight().to(mod.bias.dtype if mod.bias is not None else torch.float32)
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, lin)
        swapped[name] = mod
    try:
        yield swapped
    finally:
        for name, mod in swapped.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, mod)


# ---- numpy views of a QuantLinear's stored tensors, transposed to the MatMul layout [in, out] ----

def _np(t):
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def weight_codes_t(q):
    """The codes as ONNX wants them, [in, out]: int8 | uint8 (asymmetric) | int4 | uint4 (asymmetric) | fp8."""
    import ml_dtypes
    import numpy as np

    from compressor.kernels.qlinear import unpack_int4

    if q.fmt == "int4":
        c = unpack_int4(q.weight_packed).numpy().astype(np.int16)
        c = (c - 8).astype(ml_dtypes.int4) if q.symmetric else c.astype(ml_dtypes.uint4)
        return np.ascontiguousarray(c.T)
    return np.ascontiguousarray(_np(q.weight_packed).T)


def weight_scale_t(q):
    """(scale, zero point or None, axis, block_size) for DequantizeLinear on the [in, out] codes.
    axis/block_size are None where the attribute is not needed (per-tensor)."""
    import ml_dtypes
    import numpy as np

    s = _np(q.weight_scale).astype(np.float32)
    zp = None if q.weight_zero_point is None else q.weight_zero_point.numpy()
    out, inp = q.out_features, q.in_features
    if q.fmt == "fp8" and q.block_size:  # B x B blocks: the same scale repeated for each row of a block row
        b = q.block_size
        s = np.repeat(s, b, axis=0)[:out]  # [out, ceil(in/B)]
        return np.ascontiguousarray(s.T), None, 0, b
    if q.fmt == "int4" and s.shape[1] == 1:
        # INT4 is always block-quantized in ONNX/TensorRT: one scale per row becomes the same scale repeated
        # over power-of-two blocks along the input axis (exact).
        block = next((b for b in (128, 64, 32, 16) if inp % b == 0), inp)
        reps = inp // block
        s = np.repeat(np.broadcast_to(s, (out, 1)), reps, axis=1)
        if zp is not None:
            zp = np.repeat(np.broadcast_to(zp, (out, 1)), reps, axis=1)
    elif s.shape == (1, 1):
        return s.reshape(()), None if zp is None else zp.reshape(()), None, None
    elif s.shape[1] == 1:  # per output channel
        return s[:, 0].copy(), None if zp is None else zp[:, 0].copy(), 1, None
    if zp is not None and q.fmt == "int4":
        zp = zp.astype(ml_dtypes.uint4)
    zt = None if zp is None else np.ascontiguousarray(zp.T)
    return np.ascontiguousarray(s.T), zt, 0, inp // s.shape[1]


def _replace_value(old, new) -> None:
    """Point every use of `old` at `new`; a graph output keeps its name (e.g. `logits`)."""
    if old.is_graph_output():
        name = old.name
        old.name = f"{name}.replaced"
        new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def _gemm_as_matmul(graph, gemm):
    """Gemm(A, W, C, transB=1) (the exporter's form of a linear on 2-D input) -> Transpose(W), MatMul, Add."""
    import onnx_ir as ir

    attrs = {k: a.value for k, a in gemm.attributes.items()}
    if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
            or attrs.get("beta", 1.0) != 1.0:
        raise KeyError(f"{gemm.name}: Gemm with attributes {attrs} is not a linear layer")
    a, w = gemm.inputs[0], gemm.inputs[1]
    c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    tr = ir.node("Transpose", [w], attributes={"perm": [1, 0]}, name=f"{gemm.name}/transpose")
    mm = ir.node("MatMul", [a, tr.outputs[0]], name=f"{gemm.name}/matmul")
    new = [tr, mm]
    y = mm.outputs[0]
    if c is not None:
        add = ir.node("Add", [y, c], name=f"{gemm.name}/bias")
        new.append(add)
        y = add.outputs[0]
    graph.insert_before(gemm, new)
    _replace_value(gemm.outputs[0], y)
    graph.remove([gemm], safe=True)
    return tr, mm


def _matmul_of(graph, weight_name: str):
    """The (Transpose, MatMul) pair reading initializer `weight_name` (a Gemm is rewritten into that form)."""
    v = graph.initializers.get(weight_name)
    if v is None:
        raise KeyError(f"initializer {weight_name} not found in the exported graph")
    users = [u for u, _ in v.uses()]
    if len(users) == 1 and users[0].op_type == "Gemm":
        return _gemm_as_matmul(graph, users[0])
    tr = next((u for u in users if u.op_type == "Transpose"), None)
    if tr is None or len(users) != 1:
        raise KeyError(f"{weight_name}: expected one Transpose user, found {[u.op_type for u in users]}")
    mm = [u for u, _ in tr.outputs[0].uses()]
    if len(mm) != 1 or mm[0].op_type != "MatMul":
        raise KeyError(f"{weight_name}: Transpose feeds {[u.op_type for u in mm]}, expected one MatMul")
    return tr, mm[0]


class _Builder:
    """Adds initializers and nodes to an onnx_ir graph before a given node."""

    def __init__(self, graph, anchor, prefix: str):
        self.graph, self.anchor, self.prefix = graph, anchor, prefix

    def const(self, suffix: str, array, dtype=None):
        import onnx_ir as ir

        name = f"{self.prefix}.{suffix}"
        t = ir.tensor(array, dtype=dtype, name=name)
        v = ir.Value(name=name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype), const_value=t)
        self.graph.register_initializer(v)
        return v

    def node(self, op: str, inputs, attrs=None, domain: str = "", name: str = ""):
        import onnx_ir as ir

        n = ir.node(op, inputs, attributes=attrs or {}, domain=domain, name=f"{self.prefix}/{name or op}")
        self.graph.insert_before(self.anchor, n)
        return n.outputs[0]


def _weight_dq(b: _Builder, q):
    """DequantizeLinear(codes [in, out], scale[, zero point]) -> float [in, out]."""
    scale, zp, axis, block = weight_scale_t(q)
    codes = b.const("weight_q", weight_codes_t(q))
    ins = [codes, b.const("weight_scale", scale)]
    if zp is not None:
        ins.append(b.const("weight_zero_point", zp))
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block is not None:
        attrs["block_size"] = block
    return b.node("DequantizeLinear", ins, attrs, name="weight_dq")


def _activation_qdq(b: _Builder, q, x, flavour: str):
    """QuantizeLinear -> DequantizeLinear on the MatMul input, with the calibrated static scale."""
    import ml_dtypes
    import numpy as np

    fmt = q.activations["format"]
    scale = b.const("input_scale", np.float32(q.input_scale.item()))
    if fmt == "fp8":
        zp = b.const("input_zero_point", np.zeros((), dtype=ml_dtypes.float8_e4m3fn))
    elif flavour == "ort":  # U8S8: uint8 with zero point 128 is our symmetric int8 grid shifted
        zp = b.const("input_zero_point", np.uint8(128))
    else:
        zp = b.const("input_zero_point", np.int8(0))
    xq = b.node("QuantizeLinear", [x, scale, zp], name="input_q")
    return b.node("DequantizeLinear", [xq, scale, zp], name="input_dq")


def _nbits_block(q, accuracy_level: int) -> int | None:
    """MatMulNBits' block along K for this layer (a power of two >= 16), or None when it has no such form.
    Per-channel scales use the largest power-of-two block dividing K and repeat the row's scale per block.
    8-bit MatMulNBits only with int8 math: with float math (accuracy_level 0) ORT 1.32 runs it 90x slower than
    with int8 math (75 ms vs 0.84 ms for SmolLM2's lm_head at one token), so such layers stay DequantizeLinear."""
    if q.fmt not in ("int4", "int8") or q.activations is not None or q.weight_scale.shape[0] != q.out_features:
        return None
    if q.fmt == "int8" and accuracy_level == 0:
        return None
    groups = q.weight_scale.shape[1]
    if groups > 1:
        block = q.in_features // groups
        return block if block >= 16 and block & (block - 1) == 0 else None
    return next((b for b in (128, 64, 32, 16) if q.in_features % b == 0), None)


def _matmul_nbits(b: _Builder, q, x, block: int, accuracy_level: int):
    """com.microsoft MatMulNBits from our codes: B uint8 [N, blocks, block * bits / 8] (INT4 two per byte, low
    nibble first, as we store it), scales [N * blocks], zero points (asymmetric only; the default is 8 for 4
    bits and 128 for 8 bits, which is where our symmetric codes sit: int4 stored +8, int8 shifted +128)."""
    import numpy as np

    from compressor.kernels.qlinear import pack_int4

    out, inp = q.out_features, q.in_features
    blocks = inp // block
    reps = blocks // q.weight_scale.shape[1]  # > 1 for per-channel scales
    scale = np.repeat(_np(q.weight_scale).astype(np.float32), reps, axis=1)  # [N, blocks]
    if q.fmt == "int4":
        bits, packed = 4, q.weight_packed.numpy().reshape(out, blocks, block // 2)
    else:
        bits = 8
        codes = q.weight_packed.numpy()
        packed = (codes.astype(np.int16) + 128).astype(np.uint8) if q.symmetric else codes
        packed = packed.reshape(out, blocks, block)
    ins = [x, b.const("weight_packed", np.ascontiguousarray(packed)), b.const("weight_scale", scale.reshape(-1))]
    if q.weight_zero_point is not None:
        import torch

        zp = torch.from_numpy(np.repeat(q.weight_zero_point.numpy(), reps, axis=1))  # [N, blocks]
        if bits == 4:
            if blocks % 2:
                zp = torch.cat([zp, torch.zeros(out, 1, dtype=zp.dtype)], dim=1)
            zp = pack_int4(zp)
        ins.append(b.const("weight_zero_point", zp.numpy().reshape(-1)))
    attrs = {"K": inp, "N": out, "bits": bits, "block_size": block, "accuracy_level": accuracy_level}
    return b.node("MatMulNBits", ins, attrs, domain="com.microsoft", name="matmul_nbits")


def set_nbits_accuracy(model_proto, level: int) -> int:
    """Set every MatMulNBits node's accuracy_level in place (0: float math, 4: int8 math). -> nodes changed."""
    n = 0
    for node in model_proto.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
                    n += 1
    return n


def lower_linears(ir_model, layers: dict, flavour: str, prefix: str = "model.", nbits_accuracy: int = 0) -> dict:
    """Rewrite the placeholder MatMuls of `layers` ({name: QuantLinear}) into `flavour`'s form.
    nbits_accuracy: MatMulNBits' accuracy_level in the ort flavour (0 float math, exact; 4 int8 math, faster).
    -> counts of each form used, e.g. {"weight_dq": 150, "activation_qdq": 150}."""
    import onnx_ir.passes.common as common

    check_lowerable({n: q.scheme for n, q in layers.items()}, flavour)
    graph = ir_model.graph
    counts: dict[str, int] = {}
    for name, q in layers.items():
        tr, mm = _matmul_of(graph, f"{prefix}{name}.weight")
        b = _Builder(graph, mm, name)
        x = mm.inputs[0]
        block = _nbits_block(q, nbits_accuracy) if flavour == "ort" else None
        if block:
            y = _matmul_nbits(b, q, x, block, nbits_accuracy)
            _replace_value(mm.outputs[0], y)
            graph.remove([mm], safe=True)
            counts["matmul_nbits"] = counts.get("matmul_nbits", 0) + 1
        else:
            w = _weight_dq(b, q)
            if q.activations is not None:
                mm.replace_input_with(0, _activation_qdq(b, q, x, flavour))
                counts["activation_qdq"] = counts.get("activation_qdq", 0) + 1
            mm.replace_input_with(1, w)
            counts["weight_dq"] = counts.get("weight_dq", 0) + 1
        weight = tr.inputs[0]
        graph.remove([tr], safe=True)
        graph.initializers.pop(weight.name)
    if flavour == "ort":
        imports = ir_model.opset_imports
        if counts.get("matmul_nbits"):
            imports.setdefault("com.microsoft", 1)
    common.RemoveUnusedNodesPass()(ir_model)
    return counts


# ---- verification helpers for graphs with activation Q/DQ ----
#
# With static per-tensor activation scales, two correct implementations do not agree bit for bit: a float
# difference of one ulp before a QuantizeLinear can move a value across a rounding boundary, one code changes
# (a whole quantization step, large where an outlier set the scale), and the change travels through every later
# layer. Measured on SmolLM2 W8A8 static: the layer inputs agree to 3e-6 until one o_proj input code flips, after
# which the logits differ by up to 45%. So the lowering is verified in two exact parts instead: the graph with its
# activation Q/DQ pairs bypassed against the model with activation quantization off (weights, layout, everything
# else), and every Q/DQ pair's scale, zero point and placement against the layer's calibrated input_scale.

def activation_qdq_pairs(model_proto) -> dict[str, tuple]:
    """{layer name: (QuantizeLinear node, DequantizeLinear node, MatMul-like consumer)} from our node names."""
    nodes = {n.name: n for n in model_proto.graph.node}
    users: dict[str, list] = {}
    for n in model_proto.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    out = {}
    for name, n in nodes.items():
        if name.endswith("/input_q") and n.op_type == "QuantizeLinear":
            layer = name[: -len("/input_q")]
            dq = nodes.get(f"{layer}/input_dq")
            consumer = users.get(dq.output[0], [None])[0] if dq is not None else None
            out[layer] = (n, dq, consumer)
    return out


def bypass_activation_qdq(model_proto) -> int:
    """Remove every activation Q/DQ pair in place (the consumer reads the float input). -> pairs removed."""
    pairs = activation_qdq_pairs(model_proto)
    drop = set()
    for q, dq, consumer in pairs.values():
        for k, name in enumerate(consumer.input):
            if name == dq.output[0]:
                consumer.input[k] = q.input[0]
        drop.update((q.name, dq.name))
    kept = [n for n in model_proto.graph.node if n.name not in drop]
    del model_proto.graph.node[:]
    model_proto.graph.node.extend(kept)
    return len(pairs)


def static_activation_layers(model) -> dict:
    """{name: QuantLinear} of the layers with a calibrated (static) input scale."""
    from compressor.kernels.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}


def check_activation_qdq(model_proto, layers: dict) -> list[str]:
    """Problems with the activation Q/DQ of `layers` ({name: QuantLinear} with static activations): a missing
    pair, a scale other than the layer's input_scale, a zero point other than 0 (128 for uint8), a pair that
    does not feed the layer's MatMul. Empty when all is right."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model_proto.graph.initializer}
    pairs = activation_qdq_pairs(model_proto)
    problems = []
    for name, q in layers.items():
        if q.activations is None or q.input_scale is None:
            continue
        if name not in pairs:
            problems.append(f"{name}: no activation QuantizeLinear/DequantizeLinear pair")
            continue
        qn, dq, consumer = pairs[name]
        scale = numpy_helper.to_array(inits[qn.input[1]])
        if scale.shape != () or np.float32(scale) != np.float32(q.input_scale.item()):
            problems.append(f"{name}: activation scale {scale} != input_scale {q.input_scale.item()}")
        zp = numpy_helper.to_array(inits[qn.input[2]])
        want = 128 if zp.dtype == np.uint8 else 0
        if float(zp.astype(np.float32)) != want or list(dq.input[1:]) != list(qn.input[1:]):
            problems.append(f"{name}: zero point {zp} (want {want}) or DequantizeLinear parameters differ")
        if consumer is None or consumer.op_type not in ("MatMul", "MatMulNBits"):
            problems.append(f"{name}: activation DequantizeLinear feeds {consumer and consumer.op_type}, not MatMul")
    return problems


@contextmanager
def activations_off(model):
    """Temporarily run every QuantLinear without activation quantization (weights stay quantized)."""
    from compressor.kernels.qlinear import QuantLinear

    saved = [(m, m.activations) for m in model.modules() if isinstance(m, QuantLinear) and m.activations]
    try:
        for m, _ in saved:
            m.activations = None
        yield len(saved)
    finally:
        for m, a in saved:
            m.activations = a
