"""Lint an ONNX file against TensorRT's explicit-quantization rules and a versioned op allow-list.

`check(path, tensorrt_version)` returns one Finding per offending node (or graph-level problem), each naming the
node, its op and the rule it breaks; an empty list means the graph is fit for TensorRT's ONNX parser as far as
these rules see. The rules (../shared/design/TARGETS.md):

  opset        within the parser's range for the TensorRT version (MAX_OPSET)
  domain       standard ONNX ops only; com.microsoft ops (MatMulNBits, ...) are ONNX Runtime's own. Plugin
               nodes are allowed when their op and domain are in PLUGINS (our kernels/ plugins)
  op           in the allow-list (ALLOWED_OPS, ops the parser imports)
  zero point   Q/DQ zero points constant and all zeros (symmetric only)
  scale        Q/DQ scales constant, finite and positive; activations (Q inputs) per-tensor only
  int4         weight-only: DequantizeLinear of a constant, block-quantized
  block        block quantization only for INT4/FP8/FP4 and only on the last or second-to-last axis
  uint8        UINT8 only at network inputs and outputs

Used by `compress check-onnx FILE` and the `tensorrt_rules` pass. Imports onnx inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Largest ONNX opset the TensorRT ONNX parser takes, by TensorRT release (TensorRT support matrix:
# 10.0 imports opsets 9-20; 11.x up to 25, opset 25 added in 11.5). Older opsets down to 9 are accepted.
MAX_OPSET = {"10.0": 20, "11.0": 24, "11.5": 25}
DEFAULT_VERSION = "11.5"
MIN_OPSET = 9

# Standard ops the TensorRT ONNX parser imports (onnx-tensorrt operators.md), the ones LLM graphs use and their
# close relatives. Ops outside it (sequence and string ops, Optional, RandomNormal, Unique, ...) are refused.
ALLOWED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization
IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop MatMul Max MaxPool Mean Min Mod Mul
Neg NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements ScatterND
Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())

# Plugin nodes (op_type, domain) that kernels/ provides; the parser finds them in the plugin registry by name.
PLUGINS = frozenset({("MoE", "compressor")})

_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Finding:
    node: str
    op_type: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"node {self.node} ({self.op_type}): [{self.rule}] {self.message}"


class CheckError(Exception):
    """The file cannot be checked at all (missing, not ONNX, external data missing, unknown version)."""


def max_opset(version: str) -> int:
    """The parser's largest opset for a TensorRT version such as "10.0", "10.8.0" or "11.5"."""
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        raise CheckError(f"TensorRT version {version!r} is not a version number like 10.0 or 11.5") from None
    known = sorted((tuple(int(p) for p in k.split(".")), v) for k, v in MAX_OPSET.items())
    if major_minor < known[0][0]:
        raise CheckError(f"TensorRT {version} is older than the oldest release these rules know "
                         f"({'.'.join(map(str, known[0][0]))}); explicit quantization rules differ")
    return [v for k, v in known if k <= major_minor][-1]


def load(path: str | Path):
    """Load the model with its external data; CheckError with the file named when anything is missing."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a corrupt file
        raise CheckError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.HasField("graph"):  # an empty file (or other stray bytes) parses as an empty ModelProto
        raise CheckError(f"{path}: not a readable ONNX model (no graph)")
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for t in model.graph.initializer:
        if uses_external_data(t):
            loc = ExternalDataInfo(t).location
            if not (path.parent / loc).is_file():
                raise CheckError(f"{path}: initializer {t.name} keeps its data in {loc}, which is missing "
                                 f"next to the model")
    if any(uses_external_data(t) for t in model.graph.initializer):
        onnx.load_external_data_for_model(model, str(path.parent))
    return model


def check(path: str | Path, tensorrt_version: str = DEFAULT_VERSION) -> list[Finding]:
    return check_model(load(path), tensorrt_version)


def check_model(model, tensorrt_version: str = DEFAULT_VERSION) -> list[Finding]:
    import onnx
    from onnx import numpy_helper

    top = max_opset(tensorrt_version)
    findings: list[Finding] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= top:
        findings.append(Finding("<graph>", "-", "opset", f"opset {opset} is outside TensorRT {tensorrt_version}'s "
                                f"range {MIN_OPSET}-{top}"))
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for n in g.node:  # Constant nodes are constants too
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    io = {v.name for v in list(g.input) + list(g.output)}
    types = _value_types(model)
    for i, n in enumerate(g.node):
        name = n.name or f"#{i}"
        add = lambda rule, msg, n=n, name=name: findings.append(Finding(name, n.op_type, rule, msg))  # noqa: E731
        if n.domain not in ("", "ai.onnx"):
            if (n.op_type, n.domain) in PLUGINS:
                continue
            why = "ONNX Runtime's own op" if n.domain == "com.microsoft" else "not a standard op"
            add("domain", f"domain {n.domain!r} is {why}; TensorRT takes standard ops and registered plugins only")
            continue
        if n.op_type not in ALLOWED_OPS:
            add("op", f"{n.op_type} is not in the TensorRT {tensorrt_version} op allow-list")
            continue
        if n.op_type in _QDQ:
            _check_qdq(n, consts, types, add, numpy_helper, onnx)
            continue
        for out in n.output:
            if types.get(out) == onnx.TensorProto.UINT8 and out not in io:
                add("uint8", f"output {out} is UINT8; TensorRT takes UINT8 only at network inputs/outputs")
    for t in g.initializer:
        if t.data_type == onnx.TensorProto.UINT8 and t.name not in io:
            findings.append(Finding(t.name, "initializer", "uint8",
                                    "UINT8 initializer; TensorRT takes UINT8 only at network inputs/outputs"))
    return findings


def _value_types(model) -> dict[str, int]:
    types = {t.name: t.data_type for t in model.graph.initializer}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


def _check_qdq(n, consts, types, add, numpy_helper, onnx) -> None:
    import numpy as np

    attrs = {a.name: a for a in n.attribute}
    block = attrs["block_size"].i if "block_size" in attrs else 0
    x = n.input[0]
    scale = n.input[1] if len(n.input) > 1 else ""
    zp = n.input[2] if len(n.input) > 2 else ""
    if scale not in consts:
        add("scale", f"scale {scale} is computed at run time; TensorRT needs constant Q/DQ scales")
    else:
        s = numpy_helper.to_array(consts[scale]).astype(np.float64)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            add("scale", f"scale {scale} has non-finite or non-positive values")
        if n.op_type == "QuantizeLinear" and s.size != 1:
            add("scale", f"activation scale {scale} has {s.size} values; TensorRT quantizes activations per tensor")
    qtype = None
    if zp:
        if zp not in consts:
            add("zero point", f"zero point {zp} is computed at run time; it must be a constant 0")
        else:
            z = consts[zp]
            qtype = z.data_type
            if np.any(numpy_helper.to_array(z).astype(np.float64) != 0):
                add("zero point", f"zero point {zp} is not all zeros; TensorRT supports symmetric quantization only")
    if n.op_type == "DequantizeLinear":
        qtype = consts[x].data_type if x in consts else types.get(x, qtype)
    elif qtype is None:
        qtype = onnx.TensorProto.UINT8  # QuantizeLinear without a zero point produces uint8
    if qtype == onnx.TensorProto.UINT8:
        add("uint8", "UINT8 quantization; TensorRT quantizes to INT8 (zero point 0), FP8, or INT4/FP4 for weights")
    int4 = qtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    if int4 and (n.op_type == "QuantizeLinear" or x not in consts):
        add("int4", "INT4 is weight-only in TensorRT: only DequantizeLinear of a constant weight")
    if int4 and not block:
        add("int4", "INT4 weights need block quantization (block_size)")
    if block:
        blockable = (onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN, getattr(onnx.TensorProto, "FLOAT4E2M1", -1))
        if qtype not in blockable:
            add("block", f"block quantization of {onnx.TensorProto.DataType.Name(qtype) if qtype else 'unknown type'}; "
                         f"TensorRT blocks INT4, FP8 and FP4 only")
        rank = len(consts[x].dims) if x in consts else None
        axis = attrs["axis"].i if "axis" in attrs else 1
        if rank is not None and (axis % rank) not in (rank - 1, rank - 2):
            add("block", f"block axis {axis} of a rank-{rank} tensor; TensorRT blocks the last or second-to-last axis")
