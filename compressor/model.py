"""ModelHandle and model loading: a local HF folder (safetensors), a compressed checkpoint of ours, a .gguf file,
an `asset:` name, or a hub id (online only; offline, a clear error asks for a local path).

`trust_remote_code` stays off unless the recipe sets it: a checkpoint that needs its own code for an architecture
transformers does not know is refused, naming its .py files. Weights load through safetensors; a folder with only
pickle weights (`.bin`/`.pt`) is read with torch.load(weights_only=True), which refuses any pickle that would run
code, and converted once into a cached safetensors copy. Before any weight is read, every safetensors header is
checked (size, offsets, each tensor's bytes) and its shapes against the config; after loading, a tensor the model
needs but the checkpoint lacks (transformers would initialise it at random) and NaN/Inf values are refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor import assets
from compressor.errors import InputError
from compressor.recipe import ASSET_PREFIX, ModelSpec, is_local_path

log = logging.getLogger("compressor.model")

# Encoder-only families: loaded with AutoModel (the bare encoder, whose hidden states are the embeddings) and
# evaluated by embedding fidelity instead of perplexity (compressor.eval.embeddings).
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "albert",
                                 "camembert", "deberta", "deberta-v2", "modernbert"})


def is_encoder(config) -> bool:
    """True for a BERT-family encoder config (or model)."""
    config = getattr(config, "config", config)
    return getattr(config, "model_type", None) in ENCODER_MODEL_TYPES


def _auto_class(model_type: str | None):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if model_type in ENCODER_MODEL_TYPES else AutoModelForCausalLM


@dataclass
class ModelHandle:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    source: str  # what the user named
    path: str  # what was loaded (folder or file)
    fingerprint: str  # sha256 over config + weight files: the cache key of the input model

    @property
    def config(self):
        return self.model.config

    @property
    def is_encoder(self) -> bool:
        return is_encoder(self.model.config)

    def num_parameters(self) -> int:
        from compressor.checkpoint_io import unique_state_dict

        return sum(t.numel() for t in unique_state_dict(self.model).values())

    def state_bytes(self) -> int:
        from compressor.checkpoint_io import state_bytes

        return state_bytes(self.model)


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def check_safetensors(path: Path) -> None:
    """Check the header against the file size, then let safetensors parse it; a clear error if either fails."""
    from compressor.checkpoint_io import read_safetensors_header

    read_safetensors_header(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as sf:
            sf.keys()
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        if "allocate memory" in str(e):  # the file may be fine: mapping it failed (RLIMIT_AS, no memory left)
            raise MemoryError(f"could not map {path}: {e}") from None
        raise InputError(f"corrupt safetensors file {path}: {e}") from None


def resolve_source(spec: ModelSpec) -> tuple[str, Path | None]:
    """-> (kind, local path). kind is 'folder', 'gguf' or 'hub'."""
    src = spec.source
    if src.startswith(ASSET_PREFIX):
        return "folder", assets.resolve(src[len(ASSET_PREFIX):])
    if not is_local_path(src):
        return "hub", None
    p = Path(src).expanduser()
    if not p.exists():
        raise InputError(f"model path not found: {p}")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        raise InputError(f"model file {p} is not a .gguf file; give a Hugging Face folder, a .gguf file or a hub id")
    return "folder", p


def load_model(spec: ModelSpec) -> ModelHandle:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor import checkpoint_io

    dtype = getattr(torch, spec.dtype)
    kind, path = resolve_source(spec)
    trust = spec.trust_remote_code
    if trust:
        log.warning("trust_remote_code is on (recipe model.trust_remote_code): the checkpoint's code will run")
    if kind == "hub":
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        if offline:
            raise InputError(f"model {spec.source!r} looks like a hub id, but the hub is offline (HF_HUB_OFFLINE); "
                             "pass a local folder with --model PATH or model.source")
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec.source, revision=spec.revision,
                                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"could not fetch model {spec.source!r} from the hub ({type(e).__name__}: {e}); "
                             "pass a local folder with --model PATH") from None
        kind = "folder"
    if kind == "gguf":
        for dep in ("gguf", "accelerate"):
            import importlib.util

            if importlib.util.find_spec(dep) is None:
                from compressor.errors import MissingDependency

                raise MissingDependency(dep, f"loading {path.name}")
        _check_gguf(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"could not load GGUF file {path}: {type(e).__name__}: {e}") from None
        return _finish(model, tok, spec, path, _sha256_files([path]))

    assert path is not None
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json: not a Hugging Face model folder")
    _check_config(path, trust)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:  # pickle weights: only tensors (weights_only=True), converted once into the cache
        path = _convert_pickles(path)
        weights = sorted(path.glob("*.safetensors"))
    for w in weights:
        check_safetensors(w)
    if checkpoint_io.read_quantization_config(path) is None:
        _check_shapes(path, weights, trust)
    fingerprint = _sha256_files([path / "config.json", *weights])
    qcfg = checkpoint_io.read_quantization_config(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"no usable tokenizer in {path}: {type(e).__name__}: {e}") from None
    try:
        if qcfg is not None:
            model = _load_compressed(path, qcfg, dtype, trust)
        else:
            import json

            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            model, info = _auto_class(model_type).from_pretrained(path, dtype=dtype, trust_remote_code=trust,
                                                                  use_safetensors=True, output_loading_info=True)
            _refuse_missing(path, info.get("missing_keys") or [])
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"could not load model from {path}: {type(e).__name__}: {e}") from None
    return _finish(model, tok, spec, path, fingerprint)


def _load_compressed(path: Path, qcfg: dict, dtype, trust: bool):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from compressor import checkpoint_io

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = _auto_class(cfg.model_type).from_config(cfg, dtype=dtype, trust_remote_code=trust)
    try:
        checkpoint_io.rebuild_structure(model, qcfg)
    except InputError as e:
        raise InputError(f"{path / 'config.json'}: {e}") from None
    state = {}
    for w in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(w)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(cfg, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise InputError(f"checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header, metadata and tensor table (memory-mapped, no tensor is converted): a truncated or
    garbled file is named here, before transformers' loader fails somewhere inside."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        for t in reader.tensors:  # each tensor's bytes must lie inside the file
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} has {t.data.nbytes} of its {t.n_bytes} bytes")
    except Exception as e:  # noqa: BLE001 - whatever the parser hits, the file is unusable
        raise InputError(f"corrupt or truncated GGUF file {path}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from None


def _check_config(path: Path, trust: bool) -> None:
    """config.json must parse and build a transformers config (a wrong-typed field is named here, not as a
    tokenizer failure later). A checkpoint whose config maps to its own Python code (`auto_map`) for an
    architecture transformers does not know is refused unless the recipe sets model.trust_remote_code; a known
    one loads transformers' own class."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path / 'config.json'} is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path / 'config.json'} is not a JSON object")
    auto = cfg.get("auto_map")
    if not auto or trust:
        return _check_builds(path, cfg, trust)
    from transformers import CONFIG_MAPPING

    if cfg.get("model_type") in CONFIG_MAPPING:
        log.warning("%s ships its own model code (auto_map); loading transformers' built-in %s instead",
                    path, cfg["model_type"])
        return _check_builds(path, cfg, trust)
    files = sorted({str(v).split(".")[0] + ".py" for v in (auto.values() if isinstance(auto, dict) else [])
                    if isinstance(v, str)})
    raise InputError(f"{path / 'config.json'}: model_type {cfg.get('model_type')!r} runs the checkpoint's own code "
                     f"({', '.join(files) or 'auto_map'}); refused unless the recipe sets "
                     "model.trust_remote_code: true")


def _check_builds(path: Path, cfg: dict, trust: bool) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 - a wrong type, an unknown model_type, a missing field
        raise InputError(f"{path / 'config.json'} is not a usable {cfg.get('model_type', 'model')} config: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


def _convert_pickles(path: Path) -> Path:
    """A folder with only pickle weights (.bin/.pt): each file is read with torch.load(weights_only=True), which
    refuses any pickle that would construct objects or call functions, and the tensors are written as safetensors
    (with the folder's config and tokenizer) into a cache entry keyed by the files' hash. Returns that folder."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from compressor.cache import Cache

    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        raise InputError(f"{path} has no weight files (*.safetensors, or pickle *.bin / *.pt)")
    state: dict = {}
    for f in pickles:
        try:
            part = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: never retried unsafely
            why = " ".join(str(e).split())[:200]
            raise InputError(f"refused {f}: {path} has only pickle weights, and this file is not loadable with "
                             f"torch.load(weights_only=True), so loading it could run code ({type(e).__name__}: "
                             f"{why})") from None
        if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in part.items()):
            raise InputError(f"refused {f}: {path} has only pickle weights, and this file is not a state dict of "
                             "tensors")
        state.update({k: v.contiguous() for k, v in part.items()})
    cache = Cache(assets.home() / "cache")
    key = _sha256_files([path / "config.json", *pickles])
    hit = cache.get("converted", key)
    if hit is not None:
        return hit

    def build(d: Path) -> None:
        for f in path.iterdir():
            if f.is_file() and f.suffix not in PICKLE_SUFFIXES and f.name != "pytorch_model.bin.index.json":
                shutil.copy2(f, d / f.name)
        seen, out = set(), {}
        for k, v in state.items():  # tied weights share storage; safetensors stores each once
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if ptr not in seen or v.numel() == 0:
                seen.add(ptr)
                out[k] = v.clone()
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})

    log.warning("%s has pickle weights only: read with weights_only=True and converted to safetensors", path)
    return cache.put("converted", key, build)


def _check_shapes(path: Path, weights: list[Path], trust: bool) -> None:
    """Every stored tensor against the shape config.json implies (the model built on the meta device: no memory),
    so a disagreement names the tensor before any weight is read."""
    import torch
    from transformers import AutoConfig

    from compressor.checkpoint_io import read_safetensors_header

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        with torch.device("meta"):  # an encoder as AutoModel (as it loads), not as a causal LM head
            model = _auto_class(cfg.model_type).from_config(cfg, trust_remote_code=trust)
    except Exception:  # noqa: BLE001 - not a causal LM transformers builds from this config: loading will say
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    bad = []
    for w in weights:
        for k, v in read_safetensors_header(w).items():
            name = next((n for n in (k, f"{prefix}.{k}", k.removeprefix(prefix + ".")) if n in expected), None)
            if name is not None and tuple(v["shape"]) != expected[name]:
                bad.append(f"{k} is {list(v['shape'])}, config needs {list(expected[name])}")
    if bad:
        raise InputError(f"{path}: config.json and the weights disagree: {'; '.join(bad[:3])}"
                         + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""))


def _refuse_missing(path: Path, missing) -> None:
    """transformers initialises a tensor the checkpoint lacks at random and only logs it (a config with more
    layers than the weights, a renamed tensor); refuse instead, naming the tensors."""
    missing = sorted(missing)
    if missing:
        raise InputError(f"{path}: config.json and the weights disagree: {len(missing)} tensor(s) the model needs "
                         f"are not in the checkpoint ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")


def _finish(model, tok, spec: ModelSpec, path: Path, fingerprint: str) -> ModelHandle:
    import torch

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # buffers: a checkpoint's scales
        if t.is_floating_point() and t.device.type != "meta" \
                and not torch.isfinite(t.float() if t.element_size() == 1 else t).all():  # fp8: no isfinite
            raise InputError(f"weight {name} of {path} contains NaN or Inf")
    return ModelHandle(model, tok, spec.source, str(path), fingerprint)
