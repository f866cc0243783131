"""ModelHandle and model loading: a local HF folder (safetensors), a compressed checkpoint of ours, a .gguf file,
an `asset:` name, or a hub id (online only; offline, a clear error asks for a local path).

`trust_remote_code` stays off unless the recipe sets it. Weights load through safetensors only; a folder with
only pickle (`.bin`) weights is refused here.
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
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"could not load GGUF file {path}: {type(e).__name__}: {e}") from None
        return _finish(model, tok, spec, path, _sha256_files([path]))

    assert path is not None
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json: not a Hugging Face model folder")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        what = f"only pickle weights ({', '.join(p.name for p in pickles)})" if pickles else "no weight files"
        raise InputError(f"{path} has {what}; compressor loads safetensors only (convert with save_pretrained)")
    for w in weights:
        check_safetensors(w)
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
            model = _auto_class(model_type).from_pretrained(path, dtype=dtype, trust_remote_code=trust,
                                                            use_safetensors=True)
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
    checkpoint_io.rebuild_structure(model, qcfg)
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


def _finish(model, tok, spec: ModelSpec, path: Path, fingerprint: str) -> ModelHandle:
    import torch

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, t in list(model.named_parameters()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"weight {name} of {path} contains NaN or Inf")
    return ModelHandle(model, tok, spec.source, str(path), fingerprint)
