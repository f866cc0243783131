"""Content-addressed cache: finished stages (compressed checkpoints), exported graphs, metrics.

Entries are folders named by a sha256 key, written to a temporary sibling and renamed into place, so a reader
sees a complete entry or none, and two runs sharing the cache never see each other's half-written files
(the loser of a rename race discards its copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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


class Cache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def _dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def get(self, kind: str, key: str) -> Path | None:
        if not self.enabled:
            return None
        d = self._dir(kind, key)
        return d if (d / ".complete").is_file() else None

    def put(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        """Build an entry in a temp folder with `build(folder)`, then rename it into place atomically."""
        final = self._dir(kind, key)
        if not self.enabled:
            raise RuntimeError("cache disabled")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key[:12]}."))
        try:
            build(tmp)
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
