"""ONNX export of decoder LMs with KV cache (torch dynamo exporter), shared by the export pass and the eval
harness (which exports the baseline for latency comparison). Torch is imported inside the functions.

Graph I/O:
  input_ids [batch, seq] int64, attention_mask [batch, total_seq] int64,
  past_key_values.{i}.key / .value [batch, kv_heads, past_seq, head_dim]
  -> logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, total_seq, head_dim]
position_ids are derived in the graph from attention_mask (cumsum - 1), so left padding works.

Quantized layers (QuantLinear) export as their packed initializers plus dequantization ops. The ONNX
optimizer's constant folding would fold those back into float weights (silently de-quantizing the file), so
folding is disabled for nodes that read low-precision initializers.
"""

from __future__ import annotations

import json

import inspect
import warnings
from pathlib import Path

_TRACE = {"batch": 2, "seq": 8, "past": 4}


def _kv_dims(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids", "attention_mask"], ["logits"]
    for i in range(n_layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def _wrapper(model):
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class ShapeLengthLayer(DynamicLayer):
        """DynamicLayer whose length comes from the shape alone. The stock `numel() == 0` branch makes the
        exporter guard past_seq != 0, which would forbid a prefill with an empty cache."""

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it

    class KVWrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m
            self.n_layers = m.config.num_hidden_layers

        def forward(self, input_ids, attention_mask, *past_flat):
            cache = DynamicCache()
            layers = []
            for i in range(self.n_layers):
                k, v = past_flat[2 * i], past_flat[2 * i + 1]
                layer = ShapeLengthLayer()
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
                layers.append(layer)
            cache.layers = layers
            seq = input_ids.shape[1]
            pos = attention_mask.long().cumsum(-1) - 1
            pos = pos.masked_fill(attention_mask == 0, 1)
            position_ids = pos[:, attention_mask.shape[1] - seq:]
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, return_dict=True, **{cache_kw: cache})
            present = getattr(out, "cache", None) or out.past_key_values
            flat = []
            for layer in present.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return KVWrapper(model).eval()


def example_inputs(config, batch: int, seq: int, past: int, dtype=None, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    kv_heads, head_dim = _kv_dims(config)
    dtype = dtype or torch.float32
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    flat = [torch.randn(batch, kv_heads, past, head_dim, generator=g).to(dtype)
            for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, *flat)


_LOW_PRECISION = ("int8", "uint8", "float8_e4m3fn", "float8_e5m2")


def _protected_initializers(wrapper) -> set[str]:
    names = set()
    for mname, mod in wrapper.named_modules():
        bufs = dict(mod.named_buffers(recurse=False))
        if any(str(b.dtype).removeprefix("torch.") in _LOW_PRECISION for b in bufs.values()):
            names.update(f"{mname}.{b}" if mname else b for b in bufs)
    return names


def _optimize(ir_model, protected: set[str], keep_transposed: set[str] = frozenset()) -> None:
    import onnx_ir as ir
    import onnxscript.optimizer

    low = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4,
           ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2}

    def should_fold(node):
        if node.op_type == "Transpose" and node.inputs[0] is not None and node.inputs[0].name in keep_transposed:
            return False  # a placeholder weight that `lower_linears` replaces with our codes
        for v in node.inputs:
            if v is not None and v.is_initializer() and (v.name in protected or v.dtype in low):
                return False  # keep the packed weight and its dequantization in the graph
        return None  # default rules elsewhere

    onnxscript.optimizer.optimize_ir(ir_model, should_fold=should_fold)


def _name_dims(ir_model, n_layers: int) -> None:
    import onnx_ir as ir

    spec = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "total_seq"], "logits": ["batch", "seq", None]}
    for i in range(n_layers):
        for kind in ("key", "value"):
            spec[f"past_key_values.{i}.{kind}"] = ["batch", None, "past_seq", None]
            spec[f"present.{i}.{kind}"] = ["batch", None, "total_seq", None]
    for v in list(ir_model.graph.inputs) + list(ir_model.graph.outputs):
        names = spec.get(v.name)
        if names is None or v.shape is None:
            continue
        dims = list(v.shape.dims)
        for j, nm in enumerate(names):
            if nm is not None and not isinstance(dims[j], int):
                dims[j] = ir.SymbolicDim(nm)
        v.shape = ir.Shape(dims)


SPARSITY_KEY = "compressor.sparsity"


def read_sparsity(path: str | Path) -> dict[str, str]:
    """{layer: pattern} recorded in an exported graph's metadata ({} when the model was not pruned)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    return json.loads(props[SPARSITY_KEY]) if SPARSITY_KEY in props else {}


def export_causal_lm(model, path: str | Path, opset: int = 18, flavour: str = "reference",
                     moe_plugin: bool = False, nbits_accuracy: int = 0, fused: bool = False) -> dict:
    """Export `model` (a transformers causal LM, possibly with QuantLinear layers) to `path`.

    flavour "reference" keeps each QuantLinear's own dequantization ops (exactly the torch numerics);
    "tensorrt" and "ort" lower them as `compressor.onnx_lowering` describes. With `moe_plugin` (tensorrt
    flavour), Mixtral-style MoE blocks become one TensorRT `MoE` plugin node each (compressor.moe_plugin_export).
    With `fused` (ort flavour), the graph is built from ONNX Runtime's fused ops instead of traced
    (compressor.ort_builder; ValueError for a model it does not cover).
    -> {form: count} of the layers lowered (empty for "reference")."""
    import contextlib
    import logging

    import torch

    from compressor.onnx_lowering import float_placeholders, lower_linears

    if fused:
        if flavour != "ort":
            raise ValueError(f"fused graphs exist for the ort flavour only, not {flavour!r}")
        from compressor.ort_builder import export_fused

        sparsity = getattr(model.config, "compressor_sparsity", None)
        return export_fused(model, path, nbits_accuracy, opset,
                            {SPARSITY_KEY: json.dumps(sparsity, sort_keys=True)} if sparsity else {})
    # The exporter logs a warning per torchvision op it cannot register; torchvision is not a dependency.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    path = Path(path)
    model.eval()
    n_layers = model.config.num_hidden_layers
    wrapper = _wrapper(model)
    dtype = next(model.parameters()).dtype
    args = example_inputs(model.config, _TRACE["batch"], _TRACE["seq"], _TRACE["past"], dtype)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=32768)
    past = torch.export.Dim("past_seq", min=0, max=32768)
    total = torch.export.Dim("total_seq", min=1, max=65536)
    kv = {0: batch, 2: past}
    # forward(input_ids, attention_mask, *past_flat): the varargs are one nested entry.
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple([kv] * (2 * n_layers)))
    ins, outs = io_names(n_layers)
    # MoE experts in a form the exporter traces: dense (fixed shapes) for TensorRT, a sparse loop otherwise;
    # or, with moe_plugin, the TensorRT plugin node for each whole routed-experts block.
    from compressor.moe_export import export_experts, pick_mode
    from compressor.moe_plugin_export import plugin_blocks, translation_table

    use_plugin = moe_plugin and flavour == "tensorrt"
    chosen = getattr(model, "_compressor_experts_mode", None)  # set by an enclosing export_experts block
    experts = contextlib.nullcontext() if chosen else export_experts(
        model, pick_mode("tensorrt" if flavour == "tensorrt" else "ort"))
    with contextlib.ExitStack() as stack:
        blocks = stack.enter_context(plugin_blocks(model)) if use_plugin else []
        layers = stack.enter_context(float_placeholders(model, skip=tuple(blocks)) if flavour != "reference"
                                     else contextlib.nullcontext({}))
        stack.enter_context(experts)
        stack.enter_context(torch.no_grad())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=ins,
                                    output_names=outs, dynamic_shapes=dynamic_shapes, optimize=False,
                                    verbose=False, report=False,
                                    custom_translation_table=translation_table() if blocks else None)
    weights = {f"model.{n}.weight" for n in layers}
    _optimize(program.model, _protected_initializers(wrapper), keep_transposed=weights)
    counts = lower_linears(program.model, layers, flavour, nbits_accuracy=nbits_accuracy) if layers else {}
    if blocks:
        counts["moe_plugin"] = len(blocks)
    _name_dims(program.model, n_layers)
    sparsity = getattr(model.config, "compressor_sparsity", None)
    if sparsity:  # {layer: "2:4" | "unstructured" ...}, set by the prune pass; build_engine reads it
        program.model.metadata_props[SPARSITY_KEY] = json.dumps(sparsity, sort_keys=True)
    size = sum(t.const_value.nbytes for t in program.model.graph.initializers.values() if t.const_value is not None)
    program.save(str(path), external_data=size > 1.8e9)  # protobuf's hard limit is 2 GiB
    return counts


def _rel_err(ref, got) -> float:
    import numpy as np

    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(ref - np.asarray(got, dtype=np.float64)).max() / max(np.abs(ref).max(), 1e-12))


def verify_against_torch(model, path: str | Path, cases=((1, 5, 0), (3, 1, 7), (2, 6, 3)),
                         bypass_activations: bool = False, exact_nbits: bool = False) -> list[dict]:
    """Run the graph in ONNX Runtime on untraced (batch, seq, past) shapes and compare with torch.
    -> [{batch, seq, past, max_rel_error}] (relative to the largest magnitude of each output).

    bypass_activations: compare the graph without its activation Q/DQ pairs against the model with activation
    quantization off (see compressor.onnx_lowering on why static activation scales make an end-to-end
    comparison chaotic); the pairs themselves are checked by `onnx_lowering.check_activation_qdq`.
    exact_nbits: run MatMulNBits nodes with float math (accuracy_level 0) whatever the file says."""
    import contextlib

    import onnx
    import onnxruntime as ort

    from compressor.onnx_lowering import activations_off, bypass_activation_qdq, set_nbits_accuracy

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT fuses DequantizeLinear -> MatMul into MatMulNBits, which by default computes in int8 (quantizing the
    # activations on the fly, ~0.5% error); level 0 keeps float math, so the check sees our numerics alone.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    source = str(path)
    if bypass_activations or exact_nbits:
        proto = onnx.load(str(path))
        if bypass_activations:
            bypass_activation_qdq(proto)
        if exact_nbits:
            set_nbits_accuracy(proto, 0)
        source = proto.SerializeToString()
    sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    ins, outs = io_names(model.config.num_hidden_layers)

    def run_graph(args):
        return sess.run(outs, {n: a.float().numpy() if a.is_floating_point() else a.numpy() for n, a in zip(ins, args)})

    reference = (lambda: activations_off(model)) if bypass_activations else contextlib.nullcontext
    return _case_errors(model, cases, run_graph, reference)


def _case_errors(model, cases, candidate, reference=None) -> list[dict]:
    """The model (inside a fresh `reference()` context, if given) against `candidate(args)` -> numpy outputs, on each
    (batch, seq, past) case of seeded example inputs. -> [{batch, seq, past, max_rel_error}]."""
    import contextlib

    import torch

    wrapper = _wrapper(model)
    dtype = next(model.parameters()).dtype
    results = []
    for b, s, p in cases:
        args = example_inputs(model.config, b, s, p, dtype, seed=b * 100 + s * 10 + p)
        with torch.no_grad():
            with (reference or contextlib.nullcontext)():
                ref = wrapper(*args)
            got = candidate(args)
        err = max(_rel_err(r.float().numpy(), g) for r, g in zip(ref, got))
        results.append({"batch": b, "seq": s, "past": p, "max_rel_error": err})
    return results


def verify_plugin_reference(model, cases=((1, 5, 0), (3, 1, 7), (2, 6, 3))) -> list[dict]:
    """For graphs with TensorRT plugin nodes, which ONNX Runtime cannot run: the model with its MoE blocks
    computed by the plugin's torch reference (BF16 in and out, as the plugin) against the model itself.
    -> [{batch, seq, past, max_rel_error}]."""
    from compressor.moe_plugin_export import plugin_blocks

    wrapper = _wrapper(model)

    def with_plugin(args):
        with plugin_blocks(model):
            return [o.float().numpy() for o in wrapper(*args)]

    return _case_errors(model, cases, with_plugin)
