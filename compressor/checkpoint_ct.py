"""Writing a model with QuantLinear layers as a compressed-tensors checkpoint (vLLM, SGLang, TensorRT-LLM).

Each QuantLinear scheme is translated into the library's QuantizationScheme (weights + input activations);
the library picks the storage format (`infer_module_format`: int-quantized, float-quantized, pack-quantized,
naive-quantized) and its compressor writes the tensors. The compressor is given our dequantized weight with
our scales and zero points, so the codes it stores are ours: after compressing, every layer is decompressed
with the library and must equal `QuantLinear.dequantized_weight()` bit for bit, or the export stops.

Our scheme -> compressed-tensors (weights):
  int8 / int4, symmetric or not   int, num_bits 8/4, strategy tensor | channel | group (group_size)
                                  codes shifted to the library's signed range (uint8 c -> c - 128, int4 c - 8)
  fp8 (E4M3)                      float 8, strategy tensor | channel | group | block ([B, B])
Input activations: dynamic -> strategy token, dynamic; static -> strategy tensor, `input_scale`.
FP8 KV cache (k_scale / v_scale) -> `kv_cache_scheme` float 8, strategy tensor or attn_head (per head).
What the format cannot hold (nvfp4, asymmetric fp8, per-expert layouts) raises NotExpressible naming the layer.
"""

from __future__ import annotations

import json
from pathlib import Path

QUANT_METHOD = "compressed-tensors"


class NotExpressible(ValueError):
    """A layer's scheme has no faithful compressed-tensors equivalent; the message names the layer."""


def _strategy(name: str, q) -> dict:
    if q.fmt == "fp8" and q.block_size:
        return {"strategy": "block", "block_structure": [q.block_size, q.block_size]}
    if q.group_size == -1:
        return {"strategy": "tensor"}
    if q.group_size == 0:
        return {"strategy": "channel"}
    if q.in_features % q.group_size:
        raise NotExpressible(f"layer {name}: group_size {q.group_size} does not divide the input width {q.in_features}")
    return {"strategy": "group", "group_size": q.group_size}


def weight_args(name: str, q):
    """QuantizationArgs for the weights of QuantLinear `q` (named `name` in errors)."""
    from compressed_tensors.quantization import QuantizationArgs

    if q.fmt == "nvfp4":
        raise NotExpressible(f"layer {name}: nvfp4 cannot be written exactly: compressed-tensors divides by the "
                             "reciprocal of our global scale and dequantizes in bfloat16")
    if q.fmt == "fp8":
        if not q.symmetric:
            raise NotExpressible(f"layer {name}: asymmetric fp8 weights have no compressed-tensors format")
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, **_strategy(name, q))
    bits = 8 if q.fmt == "int8" else 4
    return QuantizationArgs(num_bits=bits, type="int", symmetric=q.symmetric, **_strategy(name, q))


def input_args(name: str, q):
    """QuantizationArgs for the input activations of `q`, or None when they stay unquantized."""
    from compressed_tensors.quantization import QuantizationArgs

    a = q.activations
    if not a:
        return None
    if a["format"] not in ("int8", "fp8"):
        raise NotExpressible(f"layer {name}: {a['format']} activations are computed with a per-call global scale; "
                             "compressed-tensors needs a calibrated static one")
    typ = "int" if a["format"] == "int8" else "float"
    if a.get("dynamic", True):
        return QuantizationArgs(num_bits=8, type=typ, symmetric=True, strategy="token", dynamic=True)
    return QuantizationArgs(num_bits=8, type=typ, symmetric=True, strategy="tensor", dynamic=False)


def layer_scheme(name: str, q):
    """(QuantizationScheme with the library's chosen format, targets left empty)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme
    from torch import nn

    scheme = QuantizationScheme(targets=[], weights=weight_args(name, q), input_activations=input_args(name, q))
    scheme.format = infer_module_format(nn.Linear, scheme)
    return scheme


def _local_state(q, scheme) -> dict:
    """The per-module state dict the library's compressors take: float weight + scales in its shapes/ranges."""
    import torch

    st = {"weight": q.dequantized_weight()}
    strategy = scheme.weights.strategy
    scale = q.weight_scale.detach().to(torch.float32)
    st["weight_scale"] = scale.reshape(1) if strategy == "tensor" else scale
    if q.weight_zero_point is not None:
        offset = 128 if q.fmt == "int8" else 8  # our unsigned codes -> the library's signed range
        zp = q.weight_zero_point.to(torch.int16) - offset
        st["weight_zero_point"] = zp.to(torch.int8).reshape(st["weight_scale"].shape)
    if q.input_scale is not None:
        st["input_scale"] = q.input_scale.detach().to(torch.float32).reshape(1)
    return st


def compress_layer(name: str, q, scheme) -> dict:
    """Compressed tensors of one layer (local names), checked to dequantize to exactly our weight."""
    import torch
    from compressed_tensors.compressors import BaseCompressor

    comp = BaseCompressor.get_value_from_registry(scheme.format)
    out = comp.compress(_local_state(q, scheme), scheme)
    back = comp.decompress(dict(out), scheme)["weight"]
    ours = q.dequantized_weight()
    if back.shape != ours.shape or back.dtype != ours.dtype or not torch.equal(back, ours):
        diff = (back.to(torch.float32) - ours).abs().max().item() if back.shape == ours.shape else float("nan")
        raise NotExpressible(f"layer {name}: {scheme.format} does not reproduce the quantized weight exactly "
                             f"(max difference {diff:.3g})")
    return out


def kv_cache_args(model):
    """(kv_cache_scheme, {state key: tensor in the library's shape}) for our FP8 KV cache, or (None, {})."""
    from compressed_tensors.quantization import QuantizationArgs

    from compressor.kernels import kv_quant

    kv = getattr(model.config, "compressor_kv_cache", None)
    if not kv:
        return None, {}
    if kv.get("format", "fp8") != "fp8":
        raise NotExpressible(f"KV cache format {kv.get('format')!r} has no compressed-tensors equivalent")
    per_head = bool(kv.get("per_head"))
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                            strategy="attn_head" if per_head else "tensor")
    tensors = {}
    for name, m in kv_quant.attention_modules(model):
        for b in ("k_scale", "v_scale"):
            s = getattr(m, b).detach().float()
            tensors[f"{name}.{b}"] = s.reshape(-1, 1, 1) if per_head else s.reshape(1)
    return args, tensors


def build(model) -> tuple[dict, object]:
    """(state dict to save, QuantizationConfig) for `model`; raises NotExpressible for what cannot be written."""
    from compressed_tensors.compressors.format import _flatten_formats
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from torch import nn

    from compressor.checkpoint_io import unique_state_dict
    from compressor.kernels.qlinear import QuantLinear

    if getattr(model.config, "compressor_unfused_experts", False):
        raise NotExpressible("the model's MoE experts were split into per-expert Linear layers, a layout its "
                             "Hugging Face class does not load; compressed-tensors export needs the original layout")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = unique_state_dict(model)
    groups: list[tuple[object, list[str]]] = []  # (scheme, layer names), in first-seen order
    for name, q in quant.items():
        scheme = layer_scheme(name, q)
        for b in list(q._buffers):
            state.pop(f"{name}.{b}", None)
        for k, t in compress_layer(name, q, scheme).items():
            state[f"{name}.{k}"] = t.contiguous()
        for s, names in groups:
            if s == scheme:
                names.append(name)
                break
        else:
            groups.append((scheme, [name]))
    kv_args, kv_tensors = kv_cache_args(model)
    state.update(kv_tensors)
    if not groups and kv_args is None:
        return state, None
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    config_groups = {}
    for i, (scheme, names) in enumerate(groups):
        # One scheme: the usual form, every Linear but the ignored ones. Several: each group names its layers.
        config_groups[f"group_{i}"] = scheme.model_copy(update={"targets": ["Linear"] if len(groups) == 1 else names})
    qc = QuantizationConfig(config_groups=config_groups, kv_cache_scheme=kv_args,
                            format=_flatten_formats({s.format for s, _ in groups}).value,
                            quantization_status=QuantizationStatus.COMPRESSED,
                            ignore=plain if len(groups) == 1 else [])
    return state, qc


def save(model, tokenizer, folder: Path) -> Path:
    """Write `model` as a compressed-tensors checkpoint into `folder` (which must exist): safetensors, config.json
    with `quantization_config` (quant_method compressed-tensors), generation config and tokenizer."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    from compressor.checkpoint_io import WEIGHTS_NAME

    folder = Path(folder)
    state, qc = build(model)
    cfg = model.config.to_dict()
    for k in ("quantization_config", "compressor_kv_cache", "compressor_unfused_experts", "_attn_implementation"):
        cfg.pop(k, None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    if qc is not None:
        ModelCompressor(quantization_config=qc).update_config(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder / WEIGHTS_NAME
