"""A run with task accuracy (our scorer and lm-eval on the same built items), measured throughput at several
batch sizes (torch CPU and ONNX Runtime CPU) and an accuracy gate, on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_text, run_cli, write_recipe


@pytest.fixture(scope="module")
def lines_dir(tmp_path_factory) -> Path:
    """20 documents of one sentence per line: 2 are held out (calibration/data.py's split)."""
    d = tmp_path_factory.mktemp("lines")
    for i in range(20):
        sents = [s.strip() for s in make_text(1500, 200 + i).split(". ") if s.strip()]
        (d / f"doc{i:02d}.txt").write_text("\n".join(s + "." for s in sents))
    return d


def _recipe(tmp_path, model, data, gates: str, lm_eval: str = "lm_eval: {tasks: [next-line]}") -> Path:
    return write_recipe(tmp_path / "tasks.yaml", f"""
schema_version: 1
name: tiny-tasks
model: {{source: {model}}}
passes:
  - {{pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32}}
eval:
  datasets: [{{name: local, source: {data}}}]
  num_windows: 2
  seq_len: 64
  latency: {{enabled: false}}
  tasks: [{{name: next-line, num_items: 24}}]
  {lm_eval}
  throughput: {{enabled: true, batch_sizes: [1, 3], prompt_len: 8, decode_tokens: 2, repetitions: 2, warmup: 1}}
{gates}
""")


def test_tasks_lm_eval_throughput_and_gates(tmp_path, tiny_model_dir, lines_dir, home, capsys):
    pytest.importorskip("lm_eval")
    gates = "gates:\n  - {metric: accuracy, max_decrease: 1.0}\n  - {metric: accuracy, min: 1.01}"
    out = tmp_path / "out"
    rc, _, err = run_cli([_recipe(tmp_path, tiny_model_dir, lines_dir, gates), "--target", "cpu", "--out", out,
                          "--quiet"], capsys)
    assert rc == 1 and "accuracy min 1.01" in err  # the impossible gate fails, naming itself
    rep = json.loads((out / "report" / "report.json").read_text())
    b, r = rep["baseline"]["metrics"], rep["result"]["metrics"]
    for m in (b, r):
        ours, theirs = m["tasks"]["next-line"], m["tasks"]["lm-eval:next-line"]
        assert ours["items"] == theirs["items"] == 24 and ours["source"] == "compressor"
        # lm-eval, through our adapter, scores the built items exactly as our own scorer does.
        assert theirs["correct"] == ours["correct"] and theirs["accuracy"] == ours["accuracy"]
        assert theirs["accuracy_norm"] == ours["accuracy_norm"]
        assert m["accuracy"] == ours["accuracy"] == sum(ours["correct"]) / 24  # the primary task
    iv = r["tasks"]["next-line"]["intervals"]
    assert iv["accuracy"]["low"] <= r["accuracy"] <= iv["accuracy"]["high"] and iv["items"] == 24
    delta = r["accuracy"] - b["accuracy"]
    assert iv["accuracy_delta"]["value"] == pytest.approx(delta)
    assert iv["accuracy_delta"]["low"] <= delta <= iv["accuracy_delta"]["high"]
    gate = {g["limit"]: g for g in rep["gates"]}
    assert gate[1.0]["passed"] and gate[1.0]["measured"] == pytest.approx(-delta)
    assert not gate[1.01]["passed"]
    # Throughput: torch CPU for both models (no ONNX graph exported: a note says so), each batch size measured.
    assert [t["backend"] for t in r["throughput"]] == [t["backend"] for t in b["throughput"]] == ["torch"]
    assert any("throughput measured with torch only" in n for n in rep["notes"])
    for t in r["throughput"] + b["throughput"]:
        assert [p["batch"] for p in t["points"]] == [1, 3] and "cores" in t["device"]
        for p in t["points"]:
            d = p["decode_tokens_per_s"]
            assert d["n"] == 2 and 0 < d["min"] <= d["median"] <= d["max"]
    md = (out / "report" / "report.md").read_text()
    assert "task next-line" in md and "task lm-eval:next-line" in md and "### Throughput (measured)" in md
    html = (out / "report" / "report.html").read_text()
    assert "<h3>Throughput (measured)</h3>" in html and html.count('class="throughput"') == 1


def test_missing_lm_eval_names_the_extra(monkeypatch):
    import builtins

    from compressor.errors import MissingDependency
    from compressor.eval import lm_eval_adapter

    real = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(MissingDependency, match=r"compressor\[lmeval\]"):
        lm_eval_adapter.require_lm_eval()


def test_ort_throughput_per_batch(tmp_path, tiny_model_dir):
    """ONNX Runtime tokens/s per batch size on an exported KV-cache graph (the ort flavour's fused graph)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compressor.eval import measure
    from compressor.onnx_export import export_causal_lm

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    path = tmp_path / "model.onnx"
    export_causal_lm(model, path, flavour="ort", fused=True)
    t = measure.ort_throughput(str(path), [1, 4], prompt_len=8, decode_tokens=3, repetitions=3, warmup=1,
                               threads=1, vocab_size=model.config.vocab_size)
    assert t["backend"] == "onnxruntime" and t["threads"] == 1 and [p["batch"] for p in t["points"]] == [1, 4]
    for p in t["points"]:
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            assert p[k]["n"] == 3 and 0 < p[k]["min"] <= p[k]["median"] <= p[k]["max"]
    # Batching amortises the per-step cost: 4 sequences decode more tokens per second than 1.
    assert t["points"][1]["decode_tokens_per_s"]["median"] > t["points"][0]["decode_tokens_per_s"]["median"]


def test_accuracy_gate_with_confidence_bounds_the_paired_drop():
    """An accuracy gate judged at a confidence uses the paired bootstrap over the primary task's items (ready for
    when the recipe allows `confidence` on accuracy; built here with model_construct)."""
    from compressor.eval.gates import evaluate
    from compressor.recipe import GateSpec

    base_c = [1] * 80 + [0] * 20
    res_c = [1] * 76 + [0] * 24  # the result loses exactly 4 of the baseline's 80 right answers
    baseline = {"accuracy": 0.8, "tasks": {"t": {"correct": base_c}}}
    result = {"accuracy": 0.76, "primary_task": "t", "tasks": {"t": {"correct": res_c}},
              "bootstrap": {"resamples": 2000, "seed": 0}}
    loose = GateSpec.model_construct(metric="accuracy", max_decrease=0.1, confidence=0.95)
    tight = GateSpec.model_construct(metric="accuracy", max_decrease=0.05, confidence=0.95)
    plain = GateSpec(metric="accuracy", max_decrease=0.05)
    g_loose, g_tight, g_plain = evaluate([loose, tight, plain], baseline, result)
    assert g_plain["passed"] and g_plain["measured"] == pytest.approx(0.04)
    # The drop's upper 95% bound: 4 items move, so the paired drop is 4/100 x (draws of those items) < 0.1 ...
    assert g_loose["passed"] and 0.04 < g_loose["bound"] < 0.1
    # ... but above 0.05: the point value passes a 5-point limit, the bound at 95% does not.
    assert not g_tight["passed"] and g_tight["bound"] > 0.05 and g_tight["bootstrap"]["task"] == "t"
