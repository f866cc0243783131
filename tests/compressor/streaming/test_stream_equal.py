"""Streamed compression (model.streaming: true) writes the same tensors as the in-memory pipeline, from a sharded
synthetic checkpoint, into correct shards, holding one block at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.synthetic_llama import SHAPES, generate
from tests.conftest import run_cli, write_recipe


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """The `tiny` synthetic Llama (4 layers, hidden 128, bf16) in shards of ~0.3 MB."""
    return generate("tiny", tmp_path_factory.mktemp("synth") / "tiny", seed=3, shard_bytes=300_000)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def run_both(tmp_path, capsys, recipe: Path, *extra) -> tuple[Path, Path, dict]:
    """(in-memory checkpoint, streamed checkpoint, streamed report)."""
    for name, flag in (("mem", "false"), ("stream", "true")):
        rc, _, err = run_cli([recipe, "--target", "h200", "--out", tmp_path / name, "--quiet", "--no-cache",
                              "--set", f"model.streaming={flag}", *extra], capsys)
        assert rc == 0, err
    report = json.loads((tmp_path / "stream" / "report" / "report.json").read_text())
    return tmp_path / "mem" / "checkpoint", tmp_path / "stream" / "checkpoint", report


def assert_identical(mem: Path, stream: Path) -> int:
    a, b = tensors(mem), tensors(stream)
    assert set(a) == set(b)
    bad = [k for k in a if not same(a[k], b[k])]
    assert not bad, bad[:5]
    qa = json.loads((mem / "config.json").read_text())["quantization_config"]
    qb = json.loads((stream / "config.json").read_text())["quantization_config"]
    assert qa == qb
    return len(qa["layers"])


def recipe(tmp_path, synth, passes: str, dtype: str = "bfloat16", calibration: str = "") -> Path:
    return write_recipe(tmp_path / "r.yaml", f"""schema_version: 1
name: s
model: {{source: {synth}, dtype: {dtype}}}
{calibration}
passes:
{passes}
export:
  - {{pass: export_checkpoint}}
""")


@pytest.mark.parametrize("passes, n_layers", [
    ("  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32}", 28),
    ("  - {pass: quantize_rtn, format: fp8, ignore: []}", 29),  # the LM head too: a unit that is one Linear
    ("  - {pass: quantize_rtn, format: int8, symmetric: false, observer: mse}", 28),
])
def test_streamed_rtn_equals_in_memory(tmp_path, synth, home, capsys, passes, n_layers):
    mem, stream, report = run_both(tmp_path, capsys, recipe(tmp_path, synth, passes))
    assert assert_identical(mem, stream) == n_layers
    info = report["passes"][0]["info"]
    assert info["streamed"] and info["layers_quantized"] == n_layers
    assert report["result"]["metrics"]["compress_seconds"] > 0


def test_streamed_gptq_equals_in_memory_with_activations_on_disk(tmp_path, synth, text_dir, home, capsys,
                                                                 monkeypatch):
    from compressor import stream_plan

    monkeypatch.setattr(stream_plan, "ACTIVATIONS_IN_MEMORY", 0)  # force the file-backed activation store
    calib = f"calibration: {{source: {text_dir}, num_samples: 4, seq_len: 64}}"
    r = recipe(tmp_path, synth, "  - {pass: quantize_gptq, format: int4, group_size: 32}", "float32", calib)
    mem, stream, report = run_both(tmp_path, capsys, r)
    assert assert_identical(mem, stream) == 28
    info = report["passes"][0]["info"]
    assert info["activations_on_disk"] is True and info["calibration_tokens"] == 4 * 64
    assert not list((tmp_path / "stream").rglob("activations.bin"))  # the scratch file is gone


def test_sharded_output_index_and_reload(tmp_path, synth, home, capsys, monkeypatch):
    from compressor import streaming
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    monkeypatch.setattr(streaming, "SHARD_BYTES", 100_000)
    r = recipe(tmp_path, synth, "  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32}")
    mem, stream, report = run_both(tmp_path, capsys, r)
    files = sorted(stream.glob("*.safetensors"))
    assert len(files) >= 4 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((stream / "model.safetensors.index.json").read_text())
    per_file = {f.name: set(load_file(str(f))) for f in files}
    assert {t: f for f, ts in per_file.items() for t in ts} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(stream).values())
    assert [a["path"] for a in report["artifacts"]] == [f"checkpoint/{f.name}" for f in files]
    assert_identical(mem, stream)
    ids = torch.tensor([[1, 70, 80, 90, 100, 110]])
    a = load_model(ModelSpec(source=str(mem), dtype="bfloat16")).model(ids).logits
    b = load_model(ModelSpec(source=str(stream), dtype="bfloat16")).model(ids).logits
    assert torch.equal(a, b)


def test_resident_weights_do_not_grow_with_layers(tmp_path, home, capsys):
    """8 layers hold exactly as many weight bytes at once as 2: one block (plus its quantized form)."""
    held = {}
    for layers in (2, 8):
        model = generate(SHAPES["tiny"], tmp_path / f"m{layers}", layers=layers, hidden=256, intermediate=768)
        r = recipe(tmp_path, model, "  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 64}",
                   "float32")
        rc, _, err = run_cli([r, "--target", "h200", "--out", tmp_path / f"o{layers}", "--quiet",
                              "--set", "model.streaming=true"], capsys)
        assert rc == 0, err
        rep = json.loads((tmp_path / f"o{layers}" / "report" / "report.json").read_text())
        held[layers] = rep["passes"][0]["info"]["max_resident_weight_bytes"]
    # The most ever held: one float32 block as read (q, o 256 x 256; k, v 128 x 256 with 2 of 4 KV heads; three
    # 768 x 256 MLP weights; two norms), before its Linears become int4 codes -- never a second block.
    block = (2 * 256 * 256 + 2 * 128 * 256 + 3 * 256 * 768 + 2 * 256) * 4
    assert held[2] == held[8] == block
