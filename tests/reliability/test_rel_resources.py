"""Resource faults: the output disk filling up and memory running out end the run with exit 2 and one line that
says which (out of disk space / out of memory), and leave no output folder and no partial sibling.

Disk: a 320 KiB tmpfs as the output's parent (where `mount` is allowed; we run as root here) and RLIMIT_FSIZE (any
file over 200 KB fails with EFBIG: CPython ignores SIGXFSZ). Memory: RLIMIT_AS a little above what the process
needs to import everything (measured first), with a ~250 MB model to load.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from _rel_helpers import compress_cmd, env


def _recipe(folder: Path, model: Path, onnx: bool = True) -> Path:
    p = folder / "r.yaml"
    p.write_text(f"""schema_version: 1
name: res
model: {{source: {model}}}
passes: [{{pass: quantize_rtn, format: int8}}]
export:
  - {{pass: export_checkpoint}}
{"  - {pass: export_onnx}" if onnx else ""}
""")
    return p


def _run_limited(cmd, home: Path, limits: dict) -> subprocess.CompletedProcess:
    def pre():
        for which, value in limits.items():
            resource.setrlimit(which, (value, value))

    return subprocess.run(cmd, env=env(home), capture_output=True, text=True, timeout=300, preexec_fn=pre)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "/s]" not in ln
             and " INFO " not in ln and " WARNING " not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_rlimit_fsize_disk_full(tiny_model_dir, tmp_path):
    out = tmp_path / "outs" / "run"
    r = _run_limited(compress_cmd(_recipe(tmp_path, tiny_model_dir), out, "--quiet"), tmp_path / "home",
                     {resource.RLIMIT_FSIZE: 200_000})
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert line.startswith("error: out of disk space") and "File too large" in line, line
    assert list(out.parent.iterdir()) == []


@pytest.fixture()
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_small_tmpfs_fills_up(tiny_model_dir, tmp_path, small_tmpfs):
    """The INT8 checkpoint (about 200 KB) fits in 320 KiB, the ONNX graph beside it does not."""
    out = small_tmpfs / "run"
    r = subprocess.run(compress_cmd(_recipe(tmp_path, tiny_model_dir), out, "--quiet"), env=env(tmp_path / "home"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert line.startswith("error: out of disk space") and "No space left on device" in line, line
    assert list(small_tmpfs.iterdir()) == []
    # the cache (on another disk) kept the finished stage, so with room the rerun reuses it
    r = subprocess.run(compress_cmd(_recipe(tmp_path, tiny_model_dir, onnx=False), out), env=env(tmp_path / "home"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["run"]


_PROBE = """
import resource, compressor.cli, compressor.pipeline, compressor.model, torch, transformers, safetensors.torch
from compressor.model import load_model
from compressor.recipe import ModelSpec
load_model(ModelSpec(source={tiny!r}))
print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmPeak')][0] * 1024)
"""


def test_rlimit_as_memory_pressure(tmp_path, tiny_model_dir):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    peak = int(subprocess.run([sys.executable, "-c", _PROBE.format(tiny=str(tiny_model_dir))], env=env(tmp_path),
                              capture_output=True, text=True, timeout=300, check=True).stdout.split()[-1])
    big = tmp_path / "big"
    shutil_copy_tokenizer(tiny_model_dir, big)
    cfg = LlamaConfig(vocab_size=320, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    with torch.no_grad():
        LlamaForCausalLM(cfg).save_pretrained(big)  # ~250 MB of float32 weights
    out = tmp_path / "outs" / "run"
    r = _run_limited(compress_cmd(_recipe(tmp_path, big, onnx=False), out, "--quiet"), tmp_path / "home",
                     {resource.RLIMIT_AS: peak + 150 * 2**20})
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    assert line.startswith("error: out of memory"), line
    assert list(out.parent.iterdir()) == []


def shutil_copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    dst.mkdir()
    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)


def test_resource_fault_reads_the_exception_chain():
    import errno

    from compressor.cli import resource_fault
    from compressor.errors import PassError

    full = OSError(errno.ENOSPC, "No space left on device", "/out/.run.partial-1-x/onnx/model.onnx")
    try:
        try:
            raise full
        except OSError as e:
            raise PassError("export_onnx", ["quantize_rtn"], f"OSError: {e}") from e
    except PassError as e:
        wrapped = e
    assert resource_fault(wrapped) == ("out of disk space writing /out/.run.partial-1-x/onnx/model.onnx "
                                       "(No space left on device)")
    assert resource_fault(OSError(errno.EFBIG, "File too large")) == "out of disk space (File too large)"
    assert resource_fault(MemoryError("could not map m.safetensors")) == "out of memory (could not map m.safetensors)"
    assert resource_fault(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")).startswith(
        "out of memory: DefaultCPUAllocator")
    assert resource_fault(ValueError("a bug")) is None and resource_fault(OSError(errno.ENOENT, "x")) is None
