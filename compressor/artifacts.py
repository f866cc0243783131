"""The run's output folder: written under a temporary sibling and renamed into place on success.

A failed run leaves nothing behind; an existing output folder is refused unless --overwrite is given, in which
case it is replaced only once the new run has finished.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import InputError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise InputError(f"output folder {out} exists; pass --overwrite to replace it, or --out another folder")
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")


@contextmanager
def atomic_output(out: Path, overwrite: bool):
    """Yield a temporary folder next to `out`; on success rename it to `out`, on any error delete it."""
    out = Path(out).absolute()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        _normalise_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normalise_modes(root: Path) -> None:
    """Temp folders and some writers (safetensors) create private files; outputs get the user's usual modes
    (executables, such as build_engine's build.sh, stay executable)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            os.chmod(p, (0o777 if os.stat(p).st_mode & 0o100 else 0o666) & ~mask)


def describe_artifact(root: Path, rel: str, kind: str) -> dict:
    p = root / rel
    files = [p] + ([p.with_name(p.name + ".data")] if p.with_name(p.name + ".data").exists() else [])
    return {"kind": kind, "path": rel, "bytes": sum(f.stat().st_size for f in files), "sha256": sha256_file(p)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("compressor", "torch", "transformers", "safetensors", "datasets", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    out["python"] = ".".join(map(str, os.sys.version_info[:3]))
    return out
