"""Corrupt and hostile model inputs, built from the tiny model: each gives exit 2, one line naming the file or the
tensor, and writes nothing (no output folder, no partial sibling).

Tried: truncated safetensors (4 cut points), bit flips in the header (seeded), header shapes that disagree with
the data, config.json disagreeing with the weights (more layers, wider), NaN and Inf weights, truncated GGUF
files, a missing tokenizer, invalid config.json, pickle-only checkpoints (loaded only through
torch.load(weights_only=True); a pickle that would create a file is refused and never runs), and a checkpoint
that ships its own model code (refused unless the recipe sets model.trust_remote_code; with it, the report warns).
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest

from _rel_helpers import run_cli

CORRUPT_TRIED: list[str] = []


def _recipe(tmp_path: Path, model: Path, extra_model: str = "", eval_dir: Path | None = None) -> Path:
    ev = f"""
eval:
  datasets: [{{name: local, source: {eval_dir}}}]
  num_windows: 2
  seq_len: 32
  latency: {{enabled: false}}
""" if eval_dir else ""
    p = tmp_path / "r.yaml"
    p.write_text(f"""schema_version: 1
name: corrupt
model:
  source: {model}
{extra_model}
passes:
  - {{pass: quantize_rtn, format: int8}}
export:
  - {{pass: export_checkpoint}}
{ev}""")
    return p


def _copy(tiny_model_dir: Path, tmp_path: Path, name: str = "m") -> Path:
    d = tmp_path / name
    shutil.copytree(tiny_model_dir, d)
    return d


def _header(f: Path) -> tuple[int, dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(f: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _lines(err: str) -> list[str]:
    """stderr without progress bars (transformers draws some even when quiet in a test's process)."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "/s]" not in ln]


def _expect_refused(tmp_path, recipe: Path, capsys, *needles: str, what: str) -> str:
    outdir = tmp_path / "outs"
    rc, out, err = run_cli([recipe, "--target", "cpu", "--out", outdir / "run", "--quiet"], capsys)
    assert rc == 2, f"{what}: exit {rc}\n{err}"
    msg = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(msg) == 1 and "Traceback" not in err, f"{what}: {err}"
    assert len(_lines(err)) == 1, f"{what}: more than one line: {err}"
    for n in needles:
        assert n in msg[0], f"{what}: {n!r} not in {msg[0]}"
    assert not outdir.exists() or list(outdir.iterdir()) == [], f"{what}: wrote {list(outdir.iterdir())}"
    CORRUPT_TRIED.append(what)
    return msg[0]


@pytest.mark.parametrize("cut", [4, 100, 0.5, -1])
def test_truncated_safetensors(tiny_model_dir, tmp_path, home, capsys, cut):
    m = _copy(tiny_model_dir, tmp_path)
    f = m / "model.safetensors"
    raw = f.read_bytes()
    n = int(len(raw) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(raw) + cut)
    f.write_bytes(raw[:n])
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, "corrupt safetensors file", str(f),
                    what=f"truncated safetensors at {n}/{len(raw)}")


def test_bit_flipped_safetensors_header(tiny_model_dir, tmp_path, home, capsys):
    """Seeded single-bit flips in the JSON header: refused (naming the file or the tensor) or, where the flip
    keeps the header meaning the same (whitespace, a digit that stays consistent), loaded unchanged; never a
    traceback, never a random-initialised tensor."""
    src = tiny_model_dir / "model.safetensors"
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(0)
    refused = 0
    for trial in range(8):
        m = _copy(tiny_model_dir, tmp_path, f"flip{trial}")
        pos = rng.randrange(8, 8 + n)
        b = bytearray(raw)
        b[pos] ^= 1 << rng.randrange(8)
        (m / "model.safetensors").write_bytes(bytes(b))
        rec = _recipe(tmp_path, m)
        outdir = tmp_path / f"o{trial}"
        rc, _, err = run_cli([rec, "--target", "cpu", "--out", outdir / "run", "--quiet"], capsys)
        CORRUPT_TRIED.append(f"header bit flip at byte {pos}")
        assert rc in (0, 2) and "Traceback" not in err, (pos, err)
        if rc == 2:
            refused += 1
            assert len(_lines(err)) == 1 and str(m) in err, (pos, err)
            assert not outdir.exists() or list(outdir.iterdir()) == []
    assert refused >= 6  # almost every flip in a JSON header breaks it (measured: 8 of 8 with this seed)


def test_header_shape_disagrees_with_data(tiny_model_dir, tmp_path, home, capsys):
    m = _copy(tiny_model_dir, tmp_path)
    f = m / "model.safetensors"
    _, header, data = _header(f)
    name = "model.layers.0.mlp.down_proj.weight"
    header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] * 2]  # twice the bytes it has
    _write_header(f, header, data)
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, str(f), name, what="header shape x2 vs offsets")


def test_transposed_header_shape_is_a_size_mismatch(tiny_model_dir, tmp_path, home, capsys):
    m = _copy(tiny_model_dir, tmp_path)
    f = m / "model.safetensors"
    _, header, data = _header(f)
    name = "model.layers.1.mlp.up_proj.weight"
    header[name]["shape"] = header[name]["shape"][::-1]  # same bytes, wrong shape for the config
    _write_header(f, header, data)
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, str(m), f"{name} is [64, 128], config needs [128, 64]",
                    what="transposed shape in header")


@pytest.mark.parametrize("change,needle", [({"num_hidden_layers": 3}, "model.layers.2."),
                                           ({"hidden_size": 128}, "config needs ["),
                                           ({"vocab_size": 1000}, "embed_tokens")])
def test_config_disagrees_with_weights(tiny_model_dir, tmp_path, home, capsys, change, needle):
    m = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(change)
    (m / "config.json").write_text(json.dumps(cfg))
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, str(m), needle, what=f"config {change} vs weights")


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_and_inf_weights(tiny_model_dir, tmp_path, home, capsys, bad):
    import torch
    from safetensors.torch import load_file, save_file

    m = _copy(tiny_model_dir, tmp_path)
    state = load_file(str(m / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"][3, 5] = float(bad)
    save_file(state, str(m / "model.safetensors"), metadata={"format": "pt"})
    assert not torch.isfinite(state["model.layers.1.self_attn.k_proj.weight"]).all()
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, "model.layers.1.self_attn.k_proj.weight",
                    "NaN or Inf", what=f"{bad} in a weight")


def test_invalid_config_json(tiny_model_dir, tmp_path, home, capsys):
    m = _copy(tiny_model_dir, tmp_path)
    (m / "config.json").write_text('{"model_type": "llama", ')
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, str(m / "config.json"), "not valid JSON",
                    what="truncated config.json")


@pytest.mark.parametrize("change,needle", [({"hidden_size": "x"}, "hidden_size"),
                                           ({"model_type": "no-such-model"}, "no-such-model")])
def test_config_that_builds_no_model(tiny_model_dir, tmp_path, home, capsys, change, needle):
    m = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(change)
    (m / "config.json").write_text(json.dumps(cfg))
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, f"{m / 'config.json'} is not a usable", needle,
                    what=f"config.json with {change}")


def test_missing_tokenizer(tiny_model_dir, tmp_path, home, capsys):
    m = _copy(tiny_model_dir, tmp_path)
    for f in m.glob("tokenizer*"):
        f.unlink()
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, "no usable tokenizer", str(m), what="no tokenizer")


def _tiny_gguf(path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("keep", [0, 16, 0.5, 0.95])
def test_truncated_gguf(tmp_path, home, capsys, keep):
    pytest.importorskip("gguf")
    f = tmp_path / "g" / "model.gguf"
    f.parent.mkdir()
    _tiny_gguf(f)
    raw = f.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    f.write_bytes(raw[:n])
    _expect_refused(tmp_path, _recipe(tmp_path, f), capsys, f"corrupt or truncated GGUF file {f}",
                    what=f"GGUF truncated to {n}/{len(raw)}")


def _pickle_only(tiny_model_dir: Path, tmp_path: Path) -> Path:
    from safetensors.torch import load_file
    import torch

    m = _copy(tiny_model_dir, tmp_path, "pickled")
    state = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    torch.save(state, m / "pytorch_model.bin")
    return m


def test_pickle_only_checkpoint_loads_through_weights_only(tiny_model_dir, tmp_path, home, capsys, text_dir):
    """A plain state-dict pickle is read with weights_only=True and gives the same model as the safetensors one."""
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    m = _pickle_only(tiny_model_dir, tmp_path)
    a = load_model(ModelSpec(source=str(tiny_model_dir)))
    b = load_model(ModelSpec(source=str(m)))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
    assert b.fingerprint == load_model(ModelSpec(source=str(m))).fingerprint  # converted once, cached
    assert len(list((home / "cache" / "converted").glob("*/*/model.safetensors"))) == 1
    rc, _, err = run_cli([_recipe(tmp_path, m), "--target", "cpu", "--out", tmp_path / "ok", "--quiet"], capsys)
    assert rc == 0, err
    CORRUPT_TRIED.append("pickle-only state dict (accepted)")


class _Payload:
    """Unpickling this calls Path.touch(marker): what a hostile checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tiny_model_dir, tmp_path, home, capsys):
    import torch
    from safetensors.torch import load_file

    m = _copy(tiny_model_dir, tmp_path, "evil")
    state = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    state["model.norm.weight"] = _Payload(marker)
    torch.save(state, m / "pytorch_model.bin")
    assert not marker.exists()
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, f"refused {m / 'pytorch_model.bin'}", "only pickle weights",
                    "weights_only=True", what="pickle with a code payload")
    assert not marker.exists()  # the payload never ran
    assert not (home / "cache" / "converted").exists() or not any((home / "cache" / "converted").rglob("*.safetensors"))


def test_no_weights_at_all(tiny_model_dir, tmp_path, home, capsys):
    m = _copy(tiny_model_dir, tmp_path)
    (m / "model.safetensors").unlink()
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, "no weight files", str(m), what="no weights")


_REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"
'''
_REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def _remote_code_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    m = _copy(tiny_model_dir, tmp_path, "remote")
    (m / "configuration_tiny_remote.py").write_text(_REMOTE_CONFIG)
    (m / "modeling_tiny_remote.py").write_text(_REMOTE_MODEL)
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type="tiny-remote", architectures=["TinyRemoteForCausalLM"],
               auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                         "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (m / "config.json").write_text(json.dumps(cfg))
    return m


def test_remote_code_refused_unless_opted_in(tiny_model_dir, tmp_path, home, capsys, text_dir):
    m = _remote_code_model(tiny_model_dir, tmp_path)
    _expect_refused(tmp_path, _recipe(tmp_path, m), capsys, "trust_remote_code", "modeling_tiny_remote.py",
                    what="trust_remote_code model without opt-in")
    out = tmp_path / "trusted"
    rec = _recipe(tmp_path, m, "  trust_remote_code: true", eval_dir=text_dir)
    rc, _, err = run_cli([rec, "--target", "cpu", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    report = json.loads((out / "report" / "report.json").read_text())
    warn = [n for n in report["notes"] if "trust_remote_code" in n]
    assert warn and "ran code shipped with the checkpoint" in warn[0], report["notes"]
    assert "trust_remote_code" in (out / "report" / "report.md").read_text()
    CORRUPT_TRIED.append("trust_remote_code model with opt-in (accepted, warned)")


@pytest.fixture(scope="module")
def compressed_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """Our own INT4 g32 checkpoint of the tiny model (quantization_config in config.json)."""
    import os

    from compressor.cli import main

    d = tmp_path_factory.mktemp("ours")
    rec = d / "q.yaml"
    rec.write_text(f"schema_version: 1\nname: q\nmodel: {{source: {tiny_model_dir}}}\n"
                   "passes: [{pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32}]\n"
                   "export: [{pass: export_checkpoint}]\n")
    old = os.environ.get("COMPRESSOR_HOME")
    os.environ["COMPRESSOR_HOME"] = str(d / "home")
    try:
        assert main([str(rec), "--target", "cpu", "--out", str(d / "out"), "--quiet"]) == 0
    finally:
        if old is None:
            del os.environ["COMPRESSOR_HOME"]
        else:
            os.environ["COMPRESSOR_HOME"] = old
    return d / "out" / "checkpoint"


def _edit_qcfg(fn):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg["quantization_config"])
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_tensors(fn):
    def edit(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(d / "model.safetensors"))
        fn(state)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


_LAYER = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("what,edit,needles", [
    ("unknown layer in quantization_config", _edit_qcfg(lambda q: q["layers"].update(
        {"model.layers.9.mlp.x": q["layers"][_LAYER]})), ["config.json", "'model.layers.9.mlp.x'"]),
    ("unknown format", _edit_qcfg(lambda q: q["layers"][_LAYER].update(format="int3")), [_LAYER, "int3"]),
    ("layers not a mapping", _edit_qcfg(lambda q: q.update(layers=[1, 2])), ["config.json", "not a mapping"]),
    ("group size disagrees with the scales", _edit_qcfg(lambda q: q["layers"][_LAYER].update(group_size=16)),
     ["weight_scale"]),
    ("packed codes missing", _edit_tensors(lambda s: s.pop(f"{_LAYER}.weight_packed")), [f"{_LAYER}.weight_packed"]),
    ("NaN scale", _edit_tensors(lambda s: s[f"{_LAYER}.weight_scale"].view(-1).__setitem__(0, float("nan"))),
     [f"{_LAYER}.weight_scale", "NaN or Inf"]),
], ids=lambda x: x if isinstance(x, str) else "")
def test_tampered_compressed_checkpoint(compressed_checkpoint, tmp_path, home, capsys, what, edit, needles):
    m = tmp_path / "ours"
    shutil.copytree(compressed_checkpoint, m)
    edit(m)
    p = tmp_path / "r.yaml"
    p.write_text(f"schema_version: 1\nname: again\nmodel: {{source: {m}}}\npasses: []\n"
                 "export: [{pass: export_checkpoint}]\n")
    _expect_refused(tmp_path, p, capsys, *needles, what=f"compressed checkpoint: {what}")


def test_zz_print_corrupt_count():
    print(f"\ncorrupt inputs tried: {len(CORRUPT_TRIED)}: {CORRUPT_TRIED}")
