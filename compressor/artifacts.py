"""The run's output folder: written under a temporary sibling and renamed into place on success.

A failed run leaves nothing behind; an existing output folder is refused unless --overwrite is given, in which
case it is replaced only once the new run has finished.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import InputError

# Set by the CLI's SIGINT handler: a run that was interrupted never renames its output into place.
INTERRUPTED = threading.Event()


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
    remove_stale(out)
    check_output(out, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    try:
        yield tmp
        if INTERRUPTED.is_set():  # Ctrl-C came, and something swallowed its KeyboardInterrupt: do not publish
            raise KeyboardInterrupt
        _normalise_modes(tmp)
        if out.exists() and not overwrite:  # another run finished into the same folder meanwhile: keep its result
            raise InputError(f"output folder {out} appeared while this run was going (another run writing there?); "
                             "it is kept and this run's output discarded: rerun with --overwrite or another --out")
        if os.path.lexists(out):  # an earlier output, or a symlink (moved aside itself, never followed)
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Delete the temporary siblings (`.NAME.partial-PID-*`, `.NAME.old-PID-*`) that a run killed before it could
    clean up (SIGKILL, power loss) left next to `out`; those of a process still running are kept."""
    import glob

    removed = []
    for p in sorted(out.parent.glob(glob.escape(f".{out.name}.") + "*-*-*")):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("partial", "old") or not pid.isdigit() or p.is_symlink() or not p.is_dir() \
                or pid_alive(int(pid)):
            continue
        if kind == "old" and not out.exists() and (p / "x").is_dir() and not (p / "x").is_symlink():
            os.replace(p / "x", out)  # killed between moving the previous output aside and the new one in
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


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


def inside(root: Path, rel: str) -> Path:
    """root / rel, refused unless it stays inside root (no `..`, absolute path or symlink leading out): names that
    come from recipes, checkpoints or cache entries never address a file outside the output folder."""
    root = Path(root)
    p = root / rel
    if os.path.isabs(rel) or not p.resolve().is_relative_to(root.resolve()):
        raise InputError(f"{rel!r} would be written outside the output folder {root}")
    return p


def describe_artifact(root: Path, rel: str, kind: str) -> dict:
    p = inside(root, rel)
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
