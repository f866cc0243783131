"""Reading and writing compressed HF checkpoints (safetensors + config.json with quantization metadata).

Format (quant_method "compressor", version 1): quantized Linear layers are stored as `<name>.weight_packed`,
`<name>.weight_scale` and, when asymmetric, `<name>.weight_zero_point` (see compressor.kernels.qlinear);
`config.json["quantization_config"]["layers"]` maps each quantized layer to its scheme. Everything else is
stored as in an ordinary checkpoint. `load_compressed` rebuilds the same QuantLinear modules, so a reloaded
model computes bit-identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUANT_METHOD = "compressor"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (no tensor data is read).
    A truncated, padded or garbled file raises InputError naming it."""
    import struct

    from compressor.errors import InputError

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes, file has {size - 8}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        for k, v in header.items():
            if k != "__metadata__":
                _check_tensor_entry(k, v)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"tensors need {8 + n + end} bytes, file has {size} (truncated or padded)")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise InputError(f"corrupt safetensors file {path}: {e}") from None
    return header


# Bytes per element of each safetensors dtype (sub-byte ones are stored packed by us, never by safetensors).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _check_tensor_entry(name: str, v) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, and offsets spanning exactly its bytes."""
    if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
        raise ValueError(f"tensor {name}: header entry lacks dtype, shape or data_offsets")
    dtype, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise ValueError(f"tensor {name}: data_offsets {offs!r} are not [begin, end]")
    if dtype in _DTYPE_BYTES:
        n = _DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        if n != offs[1] - offs[0]:
            raise ValueError(f"tensor {name}: shape {shape} of {dtype} needs {n} bytes, its offsets span "
                             f"{offs[1] - offs[0]}")


def quantized_layers(model) -> dict[str, dict]:
    from compressor.kernels.qlinear import QuantLinear

    return {n: m.scheme for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def unique_state_dict(model) -> dict[str, Any]:
    """state_dict without aliases (tied embeddings): the first name of each storage wins."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else (k,)
        if key in seen:
            continue
        seen[key] = k
        out[k] = t.detach().contiguous()
    return out


def state_bytes(model) -> int:
    """Bytes of the model's weights as they ship (packed codes, scales), tied tensors counted once."""
    return sum(t.numel() * t.element_size() for t in unique_state_dict(model).values())


def save_compressed(model, tokenizer, folder: Path, extra_meta: dict | None = None) -> Path:
    """Write model (with any QuantLinear layers), config and tokenizer into `folder` (which must exist)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    layers = quantized_layers(model)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    kv = cfg.pop("compressor_kv_cache", None)
    unfused = cfg.pop("compressor_unfused_experts", False)
    if layers or kv or unfused:
        q = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers, **(extra_meta or {})}
        if kv:
            q["kv_cache"] = kv
        if unfused:
            q["unfused_experts"] = True  # experts stored as experts.<e>.{gate,up,down}_proj Linear layers
        cfg["quantization_config"] = q
        if kv:  # transformers must not look for our attention implementation by name when loading elsewhere
            cfg.pop("_attn_implementation", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except Exception:  # noqa: BLE001 - a model without a valid generation config is still a model
            pass
    save_file(unique_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder / WEIGHTS_NAME


def rebuild_structure(model, qcfg: dict) -> None:
    """Before loading a compressed checkpoint's tensors: split experts, add KV scales, swap in QuantLinear."""
    if qcfg.get("unfused_experts"):
        from compressor.moe import unfuse_experts

        unfuse_experts(model)
    kv = qcfg.get("kv_cache")
    if kv:
        from compressor.kernels import kv_quant

        kv_quant.install(model, bool(kv.get("per_head")))
        model.config.compressor_kv_cache = dict(kv)
    replace_linears(model, qcfg.get("layers", {}))


def replace_linears(model, layers: dict[str, dict]) -> None:
    """Swap the named nn.Linear modules for empty QuantLinear modules of the given schemes."""
    from compressor.kernels.qlinear import QuantLinear

    from compressor.errors import InputError

    if not isinstance(layers, dict):
        raise InputError(f"quantization_config.layers is a {type(layers).__name__}, not a mapping of layer names")
    for name, scheme in layers.items():
        try:
            lin = model.get_submodule(name)
            q = QuantLinear.from_scheme(lin, scheme)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"quantization_config.layers names {name!r}, which the model cannot hold as a "
                             f"quantized layer ({type(e).__name__}: {e})") from None
        model.set_submodule(name, q)


def read_quantization_config(folder: Path) -> dict | None:
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        return None
    q = json.loads(cfg_path.read_text()).get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None
