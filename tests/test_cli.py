"""The `compress` command end to end on a tiny model: outputs, exit codes, atomicity, cache reuse, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compressor.cli import main


def _run(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _siblings(out: Path) -> list[str]:
    """Anything the run left next to the output folder (partial folders would show up here)."""
    return sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []


def test_end_to_end_then_cached_rerun(tiny_recipe, tmp_path, home, capsys):
    recipe = tiny_recipe(gates="gates:\n  - {metric: perplexity, max_increase_pct: 5}\n  - {metric: top1_agreement, min: 0.9}")
    out = tmp_path / "out" / "run1"
    rc, stdout, err = _run([recipe, "--target", "h200", "--out", out, "--json"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["ok"] and summary["out"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "manifest.json", "onnx", "report"]
    assert _siblings(out) == ["run1"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["schema_version"] == 1 and report["target"] == "h200"
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    assert abs(r["perplexity"] / b["perplexity"] - 1) < 0.05
    assert 0 <= r["kl_divergence"] < 0.05 and r["top1_agreement"] > 0.9
    assert r["model_bytes"] < 0.5 * b["model_bytes"]
    assert r["latency_ms_decode"]["n"] == 2 and r["latency"]["backend"] == "onnxruntime"
    assert r["modeled"]["target"] == "h200" and len(r["modeled"]["points"]) == 3
    assert [g["passed"] for g in report["gates"]] == [True, True]
    assert {a["kind"] for a in report["artifacts"]} == {"checkpoint", "onnx"}
    md = (out / "report" / "report.md").read_text()
    assert "MODELED" in md and "perplexity" in md
    svg = (out / "report" / "quality_vs_size.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["quantize_rtn", "export_checkpoint", "export_onnx"]
    assert not any(p["cached"] for p in manifest["passes"]) and manifest["versions"]["torch"]
    onnx_check = manifest["passes"][2]["info"]["verification"]
    assert max(c["max_rel_error"] for c in onnx_check) < 1e-4

    # Same recipe again: every stage comes from the cache and the artifacts are byte-identical.
    out2 = tmp_path / "out" / "run2"
    rc, stdout, err = _run([recipe, "--target", "h200", "--out", out2, "--json"], capsys)
    assert rc == 0, err
    manifest2 = json.loads((out2 / "manifest.json").read_text())
    assert all(p["cached"] for p in manifest2["passes"])
    assert [a["sha256"] for a in manifest2["artifacts"]] == [a["sha256"] for a in manifest["artifacts"]]

    # Existing output folder: refused (exit 2), untouched; --overwrite replaces it.
    before = (out / "manifest.json").read_text()
    rc, _, err = _run([recipe, "--target", "h200", "--out", out], capsys)
    assert rc == 2 and "exists" in err and "--overwrite" in err
    assert (out / "manifest.json").read_text() == before
    rc, _, err = _run([recipe, "--target", "cpu", "--out", out, "--overwrite", "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads((out / "report" / "report.json").read_text())["target"] == "cpu"
    assert _siblings(out) == ["run1", "run2"]


def test_no_cache_run_writes_nothing_to_the_cache(tiny_recipe, tmp_path, home, capsys):
    rc, _, err = _run([tiny_recipe(), "--target", "cpu", "--out", tmp_path / "nc", "--no-cache", "--quiet"], capsys)
    assert rc == 0, err
    assert not (home / "cache").exists()
    report = json.loads((tmp_path / "nc" / "report" / "report.json").read_text())
    assert report["result"]["metrics"]["latency_ms_decode"]["n"] == 2


def test_same_recipe_twice_gives_identical_bytes(tiny_recipe, tmp_path, home, capsys):
    """Without the cache, two runs recompute everything and still agree to the byte (timings excepted)."""
    recipe = tiny_recipe(fmt="int4\n    granularity: per_group\n    group_size: 32")
    runs = []
    for i in range(2):
        out = tmp_path / f"det{i}"
        rc, _, err = _run([recipe, "--target", "cpu", "--out", out, "--no-cache", "--quiet",
                           "--set", "eval.latency.enabled=false"], capsys)
        assert rc == 0, err
        runs.append(json.loads((out / "report" / "report.json").read_text()))
    assert [a["sha256"] for a in runs[0]["artifacts"]] == [a["sha256"] for a in runs[1]["artifacts"]]
    assert runs[0]["result"]["metrics"]["eval_sets"] == runs[1]["result"]["metrics"]["eval_sets"]


def test_failed_gate_exits_1_and_keeps_outputs(tiny_recipe, tmp_path, home, capsys):
    recipe = tiny_recipe(fmt="int4\n    granularity: per_group\n    group_size: 32",
                         gates="gates:\n  - {metric: kl_divergence, max: 0.0}",
                         export="export: []")
    out = tmp_path / "gated"
    rc, _, err = _run([recipe, "--target", "cpu", "--out", out, "--set", "eval.latency.enabled=false"], capsys)
    assert rc == 1 and "kl_divergence max 0.0" in err
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["gates"][0]["passed"] is False and report["gates"][0]["value"] > 0
    assert "FAIL" in (out / "report" / "report.md").read_text()


BAD = {
    "unknown key": ("--set", "model.sorce=x", "unknown key 'sorce'"),
    "wrong type": ("--set", "eval.num_windows=lots", "eval.num_windows"),
    "unknown pass": ("--set", "passes.0.pass=quantize_rtm", "did you mean 'quantize_rtn'"),
    "unknown target": ("--target", "h300", "unknown target 'h300'"),
    "illegal format": ("--set", "passes.0.format=fp8", "fp8 is not supported on target a100"),
    "missing model": ("--model", "/no/such/model", "not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(case, tiny_recipe, tmp_path, home, capsys):
    flag, value, expected = BAD[case]
    args = [tiny_recipe(), "--out", tmp_path / "o" / "run"]
    target = "a100" if case == "illegal format" else "cpu"
    args += [flag, value] + (["--target", target] if flag != "--target" else [])
    rc, _, err = _run(args, capsys)
    assert rc == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_export_before_quantize_is_refused(tiny_recipe, tmp_path, home, capsys):
    recipe = tiny_recipe()
    text = recipe.read_text().replace("passes:\n", "passes:\n  - pass: export_onnx\n", 1)
    recipe.write_text(text)
    rc, _, err = _run([recipe, "--target", "cpu", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "changes the model after export_onnx" in err and "recipe.yaml:8" in err
    assert not (tmp_path / "o").exists()


def test_group_size_not_dividing_names_layer_and_writes_nothing(tiny_recipe, tmp_path, home, capsys):
    recipe = tiny_recipe(fmt="int4\n    granularity: per_group\n    group_size: 48")
    out = tmp_path / "o" / "run"
    rc, _, err = _run([recipe, "--target", "cpu", "--out", out], capsys)
    assert rc == 2 and "does not divide the input width 64 of layer model.layers.0.self_attn.q_proj" in err
    assert _siblings(out) == []


def test_truncated_safetensors_is_refused(tiny_recipe, tiny_model_dir, tmp_path, home, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out = tmp_path / "o" / "run"
    rc, _, err = _run([tiny_recipe(), "--target", "cpu", "--model", broken, "--out", out], capsys)
    assert rc == 2 and "corrupt safetensors file" in err and "model.safetensors" in err
    assert _siblings(out) == []


def test_corrupt_header_is_refused(tiny_recipe, tiny_model_dir, tmp_path, home, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    w = broken / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage JSON header
    w.write_bytes(bytes(data))
    rc, _, err = _run([tiny_recipe(), "--target", "cpu", "--model", broken, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "corrupt safetensors file" in err, err


@pytest.mark.parametrize("words,expected", [(0, "holds no text"), (30, "need 8 x 64 = 512")])
def test_empty_or_short_calibration_text(words, expected, tiny_recipe, tmp_path, home, capsys):
    from tests.conftest import make_text

    d = tmp_path / "calib"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(make_text(words, i) if words else "  ")
    recipe = tiny_recipe()
    recipe.write_text(recipe.read_text() + f"calibration:\n  source: {d}\n  num_samples: 8\n  seq_len: 64\n")
    out = tmp_path / "o" / "run"
    rc, _, err = _run([recipe, "--target", "cpu", "--out", out], capsys)
    assert rc == 2 and expected in err, err
    assert _siblings(out) == []


def test_pickle_only_checkpoint_is_refused(tiny_recipe, tiny_model_dir, tmp_path, home, capsys):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    rc, _, err = _run([tiny_recipe(), "--target", "cpu", "--model", d, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "only pickle weights" in err


def test_hub_id_offline_asks_for_local_path(tiny_recipe, tmp_path, home, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = _run([tiny_recipe(), "--target", "cpu", "--model", "HuggingFaceTB/SmolLM2-135M",
                       "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "--model PATH" in err and "offline" in err


def test_targets_and_help(capsys):
    rc, out, _ = _run(["targets"], capsys)
    assert rc == 0 and "h200" in out and "141 GB" in out and "4.80 TB/s" in out
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0 and "plan" in out and "assets" in out


def test_ctrl_c_leaves_no_output(tiny_recipe, tmp_path, home):
    """SIGINT in the middle of a run ends it with 130 and removes the partial folder; the stage finished before it
    stays cached. The signal goes at a known point, once the ONNX export has said on stderr that it started
    (a thread reads stderr, so a run that goes silent fails the test instead of hanging it), and the CLI remembers
    it: a KeyboardInterrupt swallowed inside a library still cannot publish the output."""
    import os
    import queue
    import signal
    import subprocess
    import sys
    import threading

    out = tmp_path / "o" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "compressor", str(tiny_recipe()), "--target", "cpu", "--out",
                             str(out)], stderr=subprocess.PIPE, text=True, env={**os.environ})
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    log = ""
    while "export_onnx: exporting" not in log:  # the known point: the export has started, after the stage was cached
        line = lines.get(timeout=180)
        assert line is not None, f"the run ended before its export started:\n{log}"
        log += line
    assert any(p.name.startswith(".run.partial-") for p in out.parent.iterdir())
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=180)
    while (line := lines.get(timeout=30)) is not None:
        log += line
    assert rc == 130, log
    assert "interrupted: the partial output folder was removed" in log
    assert list(out.parent.iterdir()) == []
    assert len(list((home / "cache" / "stage").glob("*/*/.complete"))) == 1  # the finished stage stays cached


def test_pass_error_names_the_passes_before_it(tiny_recipe, tmp_path, home, capsys):
    out = tmp_path / "o" / "run"
    rc, _, err = _run([tiny_recipe(fmt="fp8"), "--target", "cpu", "--out", out, "--set", "export.1.opset=18"], capsys)
    assert rc == 2, err
    assert "pass export_onnx (after quantize_rtn, export_checkpoint) failed: FP8 weights need opset 19" in err
    assert _siblings(out) == []


def test_report_verb_rerenders_and_refuses_unknown_schema(tiny_recipe, tmp_path, home, capsys):
    out = tmp_path / "r"
    rc, _, err = _run([tiny_recipe(export="export: []"), "--target", "h200", "--out", out, "--quiet",
                       "--set", "eval.latency.enabled=false"], capsys)
    assert rc == 0, err
    rep = out / "report"
    md = (rep / "report.md").read_text()
    for name in ("report.md", "report.html", "pareto.png"):
        (rep / name).unlink()
    rc, stdout, err = _run(["report", out], capsys)
    assert rc == 0 and "report.html" in stdout, err
    assert (rep / "report.md").read_text() == md and (rep / "pareto.png").stat().st_size > 10_000
    assert "95% intervals" in md and "MODELED" in (rep / "report.html").read_text()

    report = json.loads((rep / "report.json").read_text())
    report["schema_version"] = 99
    (rep / "report.json").write_text(json.dumps(report))
    rc, _, err = _run(["report", out], capsys)
    assert rc == 2 and "report schema_version 99 is not one this compressor reads (1)" in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = _run(["report", tmp_path / "nowhere"], capsys)
    assert rc == 2 and "no report/report.json here" in err


def test_compare_two_runs_pairs_windows_and_lists_changed_gates(tiny_recipe, tmp_path, home, capsys):
    """INT8 against INT4 on the same held-out windows: B - A is bootstrapped paired; the gate that INT4 fails is
    listed as changed."""
    gates = "gates:\n  - {metric: kl_divergence, max: 0.00001}\n  - {metric: top1_agreement, min: 0.5}"
    outs = []
    for name, fmt in (("a", "int8"), ("b", "int4\n    granularity: per_group\n    group_size: 32")):
        outs.append(tmp_path / name)
        rc, _, err = _run([tiny_recipe(fmt=fmt, export="export: []", gates=gates), "--target", "cpu", "--out",
                           outs[-1], "--quiet", "--set", "eval.latency.enabled=false"], capsys)
        assert rc == (0 if name == "a" else 1), err
    rc, stdout, err = _run(["compare", *outs, "--json"], capsys)
    assert rc == 0, err
    c = json.loads(stdout)
    assert c["same_baseline_model"]
    rows = {r["metric"]: r for r in c["quality"]}
    ppl = rows["perplexity"]
    assert ppl["paired"] and ppl["difference"]["low"] <= ppl["difference"]["value"] <= ppl["difference"]["high"]
    kl = rows["kl_divergence"]
    assert kl["b"] > kl["a"] and kl["difference"]["value"] == pytest.approx(kl["b"] - kl["a"])
    assert kl["difference"]["low"] > 0  # INT4 is worse than INT8 on these windows, with 95% confidence
    # The paired interval of the difference is narrower than B's own interval.
    assert kl["difference"]["high"] - kl["difference"]["low"] < kl["b_interval"]["high"] - kl["b_interval"]["low"]
    changed = [g for g in c["gates"] if g["changed"]]
    assert [(g["metric"], g["a"], g["b"]) for g in changed] == [("kl_divergence", True, False)]
    rc, stdout, _ = _run(["compare", *outs], capsys)
    assert rc == 0 and "## Gates (1 changed)" in stdout and "paired" in stdout and "model_bytes" in stdout
