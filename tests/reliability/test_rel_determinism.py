"""Determinism: the same recipe run twice, in separate processes with different hash seeds, with separate caches
(the second without any cache), gives byte-identical checkpoints (our format and compressed-tensors), ONNX files
(reference and ort flavours), Pareto plot and report facts.

Exceptions, by design, and why:
- timings (`seconds`, `compress_seconds`) and memory (`peak_rss_mb*`, `memory_mb`): they measure the machine at
  that moment; so report.md and report.html, which print them, differ in those cells only;
- `cached`: says how a stage was obtained (computed or reused), not what it is;
- manifest `versions`: the same here, but a rerun after an upgrade is expected to differ there.
"""

from __future__ import annotations

import json
import re

from _rel_helpers import TIMING_KEYS, env, fingerprint, compress_cmd

import subprocess


def _recipe(tmp_path, model, text):
    p = tmp_path / "det.yaml"
    p.write_text(f"""schema_version: 1
name: det
seed: 7
model: {{source: {model}}}
calibration: {{source: {text}, num_samples: 8, seq_len: 64}}
passes:
  - {{pass: quantize_gptq, format: int4, group_size: 32, act_order: true}}
export:
  - {{pass: export_checkpoint}}
  - {{pass: export_checkpoint, format: compressed-tensors, folder: checkpoint-ct}}
  - {{pass: export_onnx}}
  - {{pass: export_onnx, flavour: ort}}
eval:
  datasets: [{{name: local, source: {text}}}]
  num_windows: 3
  seq_len: 64
  latency: {{enabled: false}}
  intervals: {{resamples: 500}}
""")
    return p


def test_same_recipe_twice_is_byte_identical(tiny_model_dir, text_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_dir, text_dir)
    outs = []
    for i, extra in enumerate([(), ("--no-cache",)]):
        out = tmp_path / f"run{i}"
        r = subprocess.run(compress_cmd(recipe, out, "--quiet", *extra), capture_output=True, text=True,
                           timeout=600, env=env(tmp_path / f"home{i}", PYTHONHASHSEED=str(i + 1)))
        assert r.returncode == 0, r.stderr
        outs.append(out)
    a, b = fingerprint(outs[0]), fingerprint(outs[1])
    assert set(a["files"]) >= {"checkpoint/model.safetensors", "checkpoint-ct/model.safetensors",
                               "onnx/model.onnx", "onnx-ort/model.onnx", "report/pareto.png"}
    for f in a["files"]:  # one assertion per file, so a failure names it
        assert a["files"][f] == b["files"][f], f"{f} differs between two runs of the same recipe"
    assert a["report"]["result"]["metrics"] == b["report"]["result"]["metrics"]
    assert a["report"] == b["report"] and a["manifest"] == b["manifest"]
    # report.md differs only in timing cells
    mds = [(o / "report" / "report.md").read_text() for o in outs]
    diff = [(x, y) for x, y in zip(*(m.splitlines() for m in mds)) if x != y]
    assert all(re.search(r"\d+(\.\d+)? ?(s|MB|ms)\b", x) for x, _ in diff), diff
    raw = [json.loads((o / "report" / "report.json").read_text()) for o in outs]
    timing = [k for k in raw[0]["result"]["metrics"] if raw[0]["result"]["metrics"][k] != raw[1]["result"]["metrics"][k]]
    assert set(timing) <= TIMING_KEYS, timing
    print(f"\ndeterminism: {len(a['files'])} files byte-identical, report metrics identical except {sorted(timing)}")
