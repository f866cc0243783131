"""What a streamed run refuses (at plan time, naming the key), and a disk that fills mid-run."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from compressor.errors import RecipeError
from compressor.pipeline import load_and_plan
from compressor.synthetic_llama import generate
from tests.conftest import REPO, write_recipe


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate("tiny", tmp_path_factory.mktemp("synth") / "tiny", seed=1)


def _recipe(tmp_path, synth, body: str):
    return write_recipe(tmp_path / "r.yaml", f"schema_version: 1\nname: s\nmodel: {{source: {synth}, streaming: true}}\n"
                        + body)


RTN = "passes:\n  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32}\n"
EXPORT = "export:\n  - {pass: export_checkpoint}\n"


@pytest.mark.parametrize("body, key, words", [
    ("passes:\n  - {pass: prune, method: magnitude, sparsity: 0.5}\n" + EXPORT, "passes.0.pass", "pass prune cannot run streamed"),
    (RTN + "  - {pass: quantize_rtn, format: int8}\n" + EXPORT, "passes.1.pass", "one quantization pass"),
    ("passes:\n  - {pass: quantize_rtn, format: int8, activations: {format: int8, dynamic: false}}\n"
     "calibration: {source: asset:python-docs}\n" + EXPORT, "passes.0.activations", "static activation scales"),
    (RTN + "export:\n  - {pass: export_checkpoint, format: compressed-tensors}\n", "export.0.format",
     "not written streamed"),
    (RTN + "export:\n  - {pass: export_onnx}\n", "export.0.pass", "pass export_onnx cannot run streamed"),
    (RTN, "export", "exactly one {pass: export_checkpoint}"),
    (RTN + EXPORT + "eval:\n  datasets: [{name: d, source: asset:python-docs}]\n", "eval", "loads the whole model"),
])
def test_refused_at_plan_time_naming_the_key(tmp_path, synth, body, key, words):
    with pytest.raises(RecipeError) as e:
        load_and_plan(str(_recipe(tmp_path, synth, body)), "h200")
    assert e.value.key == key and words in str(e.value) and e.value.line is not None


def test_plan_estimate_does_not_grow_with_layers(tmp_path):
    from compressor import stream_plan

    est = {}
    for layers in (2, 8):
        m = generate("tiny", tmp_path / f"m{layers}", layers=layers)
        plan = load_and_plan(str(REPO / "recipes/stream-w4a16-rtn.yaml"), "h200", model_override=str(m))
        est[layers] = plan.estimate
    from compressor.plan import render

    assert f"streaming: {8 + 3} units one at a time; peak = base 0.41" in render(plan)
    assert est[8]["model_bytes"] > 3 * est[2]["model_bytes"] * 0.9
    assert est[2]["peak_memory_bytes"] == est[8]["peak_memory_bytes"]
    s = est[8]["streaming"]
    assert s["units"] == 8 + 3 and s["peak_unit"].startswith("model.layers.")
    # tiny: the bf16 block (q, o 128 x 128; k, v 64 x 128; MLP 3 x 256 x 128; two norms) + RTN on a 256 x 128 Linear
    assert s["largest_unit"] == (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128 + 2 * 128) * 2
    assert s["quantize_work"] == int(stream_plan.WORK_RTN * 4 * 256 * 128)


def _fill_limit() -> None:
    # Child: files may not grow past 150 kB, and the kernel's SIGXFSZ is ignored so write() fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


def test_disk_full_stops_with_one_line_and_leaves_nothing(tmp_path, synth, home):
    from compressor.stream_io import DiskFull, ShardWriter

    w = ShardWriter(tmp_path / "w")
    w._data = open("/dev/full", "wb", buffering=0)  # a device that is always full: ENOSPC on every write
    with pytest.raises(DiskFull, match=r"disk full while writing .*/w/model-00001.safetensors \(No space left"):
        w.add("t", torch.ones(4))

    r = _recipe(tmp_path, synth, "passes:\n  - {pass: quantize_rtn, format: fp8}\n" + EXPORT)
    out = tmp_path / "outs" / "o"
    (tmp_path / "outs").mkdir()
    env = dict(os.environ, COMPRESSOR_HOME=str(home), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "compressor", str(r), "--target", "h200", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, preexec_fn=_fill_limit, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    # The CLI's resource-fault line (compressor.cli.resource_fault), naming the shard being written.
    assert len(lines) == 1 and lines[0].startswith("error: out of disk space writing ") and \
        lines[0].endswith("/checkpoint/model-00001.safetensors (File too large)"), p.stderr
    assert "Traceback" not in p.stderr
    assert list((tmp_path / "outs").iterdir()) == []  # neither the output nor its temporary folder
