"""Content-addressed cache: finished stages (compressed checkpoints), exported graphs, metrics.

Entries are folders named by a sha256 key, written to a temporary sibling and renamed into place, so a reader
sees a complete entry or none, and two runs sharing the cache never see each other's half-written files
(the loser of a rename race discards its copy).

Every entry records how long its result took to compute (`.timing.json`): the time from the lookup that missed
to the `put` that stored it (so the passes that ran in between count, not only the writing), or the `build`
time when nothing was looked up first. A hit adds that to this process's `ledger()`, which `compress sweep`
reads to report the time reuse saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable


def key_of(*parts: Any) -> str:
    """Stable sha256 over JSON-serialisable parts."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def sha256_tensor(t) -> str:
    """Content hash of a tensor (dtype, shape and bytes), e.g. of tokenized calibration or eval windows."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# Hits of this process: (kind, key, seconds the hit saved). Shared by every Cache instance; only appended to.
_LEDGER: list[tuple[str, str, float]] = []
_LEDGER_LOCK = threading.Lock()


def ledger(start: int = 0) -> list[tuple[str, str, float]]:
    """Cache hits of this process from position `start` on: [(kind, key, seconds saved)]."""
    with _LEDGER_LOCK:
        return list(_LEDGER[start:])


def ledger_len() -> int:
    with _LEDGER_LOCK:
        return len(_LEDGER)


def entry_seconds(entry: Path) -> float:
    """Seconds an entry took to compute (0 for entries written before entries were timed)."""
    try:
        return float(json.loads((Path(entry) / ".timing.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _remove_dead_builds(folder: Path) -> None:
    """Temporary build folders (`.KEY12.PID.*`) of processes that died mid-build (SIGKILL, power loss)."""
    from compressor.artifacts import pid_alive

    for p in folder.glob(".*.*.*"):
        pid = p.name.split(".")[2]
        if pid.isdigit() and not p.is_symlink() and p.is_dir() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


class Cache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self._missed: dict[tuple[str, str], float] = {}  # (kind, key) -> when a lookup missed

    def _dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def get(self, kind: str, key: str) -> Path | None:
        if not self.enabled:
            return None
        d = self._dir(kind, key)
        if not (d / ".complete").is_file():
            self._missed.setdefault((kind, key), time.perf_counter())
            return None
        with _LEDGER_LOCK:
            _LEDGER.append((kind, key, entry_seconds(d)))
        return d

    def put(self, kind: str, key: str, build: Callable[[Path], None], seconds: float | None = None) -> Path:
        """Build an entry in a temp folder with `build(folder)`, then rename it into place atomically.
        `seconds`: what computing the result cost (default: since the lookup of this key missed, else the build)."""
        final = self._dir(kind, key)
        if not self.enabled:
            raise RuntimeError("cache disabled")
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(final.parent)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key[:12]}.{os.getpid()}."))
        t0 = time.perf_counter()
        try:
            build(tmp)
            if seconds is None:
                seconds = time.perf_counter() - self._missed.pop((kind, key), t0)
            (tmp / ".timing.json").write_text(json.dumps({"seconds": round(seconds, 3), "kind": kind}) + "\n")
            (tmp / ".complete").write_text("1\n")
            try:
                os.replace(tmp, final)
            except OSError:  # another run finished the same entry first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def get_json(self, kind: str, key: str) -> Any | None:
        d = self.get(kind, key)
        return json.loads((d / "value.json").read_text()) if d else None

    def put_json(self, kind: str, key: str, value: Any) -> None:
        if self.enabled:
            self.put(kind, key, lambda d: (d / "value.json").write_text(json.dumps(value, indent=1, sort_keys=True)))
