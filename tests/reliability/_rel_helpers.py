"""Helpers of the reliability tests: a calibrated tiny recipe, running `compress` as a real process, and what two
runs must agree on byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# Facts of a report that measure this run's machine and moment, not its result: excluded from comparisons.
TIMING_KEYS = {"seconds", "compress_seconds", "peak_rss_mb", "peak_rss_mb_compress", "memory_mb", "cached"}


def calibrated_recipe(folder: Path, model: Path, text: Path, name: str = "rel", onnx: bool = True,
                      num_samples: int = 16) -> Path:
    """GPTQ INT4 with calibration, checkpoint (+ ONNX) export, eval on 2 windows: every kind of stage."""
    export = "  - {pass: export_checkpoint}\n" + ("  - {pass: export_onnx}\n" if onnx else "")
    p = folder / f"{name}.yaml"
    p.write_text(f"""schema_version: 1
name: {name}
model:
  source: {model}
calibration:
  source: {text}
  num_samples: {num_samples}
  seq_len: 64
passes:
  - {{pass: quantize_gptq, format: int4, group_size: 32}}
export:
{export}eval:
  datasets: [{{name: local, source: {text}}}]
  num_windows: 2
  seq_len: 64
  latency: {{enabled: false}}
""")
    return p


def env(home: Path, **extra) -> dict:
    return {**os.environ, "COMPRESSOR_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def compress_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "compressor", str(recipe), "--target", "cpu", "--out", str(out), *extra]


def run(recipe: Path, out: Path, home: Path, *extra: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(compress_cmd(recipe, out, *extra), env=env(home), capture_output=True, text=True,
                          timeout=timeout, **kw)


class Watched:
    """A `compress` process whose stderr is read line by line in a thread, so a test can wait for a line."""

    def __init__(self, cmd: list[str], environ: dict, **kw):
        self.proc = subprocess.Popen(cmd, env=environ, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, bufsize=1, **kw)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # EOF
            self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float = 180) -> bool:
        """True once a stderr line contains `needle`; False if the process ended (or timed out) first."""
        end = time.time() + timeout
        with self._cond:
            i = 0
            while True:
                while i < len(self.lines):
                    if self.lines[i] is None:
                        return False
                    if needle in self.lines[i]:
                        return True
                    i += 1
                if not self._cond.wait(timeout=max(0.0, end - time.time())) and time.time() >= end:
                    return False

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self._t.join(timeout=10)
        return rc, "".join(x for x in self.lines if x)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def fingerprint(out: Path) -> dict:
    """What an identical run must reproduce exactly: every checkpoint and ONNX file, the Pareto plot, and the
    report's and manifest's facts without timings and memory (and without `cached`, which says how a stage was
    obtained, not what it is)."""
    files = {str(p.relative_to(out)): sha(p) for p in sorted(out.rglob("*"))
             if p.is_file() and p.relative_to(out).parts[0].startswith(("checkpoint", "onnx"))}
    files["report/pareto.png"] = sha(out / "report" / "pareto.png")
    report = _strip(json.loads((out / "report" / "report.json").read_text()))
    manifest = _strip(json.loads((out / "manifest.json").read_text()))
    manifest.pop("versions", None)
    return {"files": files, "report": report, "manifest": manifest}


def complete(out: Path, reference: Path) -> bool:
    """The same file list as the reference run's (a complete output), and a manifest."""
    names = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    return (out / "manifest.json").is_file() and names(out) == names(reference)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the compress CLI in this process. (Not imported from tests/conftest.py: a
    conftest.py in a subfolder can shadow that module name during collection.)"""
    from compressor.cli import main

    rc = main([str(a) for a in args])
    return rc, *capsys.readouterr()
