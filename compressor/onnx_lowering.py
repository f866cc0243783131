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
def float_placeholders(model):
    """Temporarily replace every QuantLinear with an nn.Linear holding its dequantized weight.
    Yields {qualified name: QuantLinear}; the QuantLinears are put back on exit."""
    import torch
    from torch import nn

    from compressor.kernels.qlinear import QuantLinear

    swapped: dict[str, QuantLinear] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
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
    if s.shape == (1, 1):
        return s.reshape(()), None if zp is None else zp.reshape(()), None, None
    if s.shape[1] == 1:  # per output channel
        return s[:, 0].copy(), None if zp is None else zp[:, 0].copy(), 1, None
    if zp is not None and q.fmt == "int4":
        zp = zp.astype(ml_dtypes.uint4)
    zt = None if zp is None else np.ascontiguousarray(zp.T)
    return np.ascontiguousarray(s.T), zt, 0, inp // s.shape[1]


def _matmul_of(graph, weight_name: str):
    """The (Transpose, MatMul) pair reading initializer `weight_name`."""
    v = graph.initializers.get(weight_name)
    if v is None:
        raise KeyError(f"initializer {weight_name} not found in the exported graph")
    users = [u for u, _ in v.uses()]
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


def _matmul_nbits(b: _Builder, q, x):
    """com.microsoft MatMulNBits from our packed INT4 bytes: B [N, blocks, block/2], scales [N * blocks]."""
    import numpy as np

    from compressor.kernels.qlinear import pack_int4

    out, inp = q.out_features, q.in_features
    groups = q.weight_scale.shape[1]
    block = inp // groups
    packed = q.weight_packed.numpy().reshape(out, groups, block // 2)
    ins = [x, b.const("weight_packed", packed), b.const("weight_scale", _np(q.weight_scale).astype(np.float32).reshape(-1))]
    if q.weight_zero_point is not None:
        zp = q.weight_zero_point
        if groups % 2:
            import torch

            zp = torch.cat([zp, torch.zeros(out, 1, dtype=zp.dtype)], dim=1)
        ins.append(b.const("weight_zero_point", pack_int4(zp).numpy().reshape(-1)))
    attrs = {"K": inp, "N": out, "bits": 4, "block_size": block, "accuracy_level": 0}
    return b.node("MatMulNBits", ins, attrs, domain="com.microsoft", name="matmul_nbits")


def _nbits_ok(q) -> bool:
    groups = q.weight_scale.shape[1]
    block = q.in_features // groups
    return q.fmt == "int4" and block >= 16 and block & (block - 1) == 0 and q.in_features % block == 0


def lower_linears(ir_model, layers: dict, flavour: str, prefix: str = "model.") -> dict:
    """Rewrite the placeholder MatMuls of `layers` ({name: QuantLinear}) into `flavour`'s form.
    -> counts of each form used, e.g. {"weight_dq": 150, "activation_qdq": 150}."""
    import onnx_ir.passes.common as common

    check_lowerable({n: q.scheme for n, q in layers.items()}, flavour)
    graph = ir_model.graph
    counts: dict[str, int] = {}
    for name, q in layers.items():
        tr, mm = _matmul_of(graph, f"{prefix}{name}.weight")
        b = _Builder(graph, mm, name)
        x = mm.inputs[0]
        if flavour == "ort" and _nbits_ok(q):
            y = _matmul_nbits(b, q, x)
            mm.outputs[0].replace_all_uses_with(y, replace_graph_outputs=True)
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
