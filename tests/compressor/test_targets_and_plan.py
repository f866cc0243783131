"""Targets and planning: legality before any weight is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from compressor.errors import RecipeError, TargetError
from compressor.pipeline import load_and_plan
from compressor.targets import TARGETS, Format, get_target

from tests.conftest import REPO


def test_profiles_carry_datasheet_facts():
    assert set(TARGETS) == {"h200", "h100", "a100", "l40s", "l4", "b200", "cpu"}
    h200 = get_target("h200")
    assert h200.memory_bytes == 141e9 and h200.bandwidth_bytes_per_s == 4.8e12 and h200.compute_capability == (9, 0)
    # Crossover batch where BF16 decode turns compute-bound: peak * 2 bytes / (2 * bandwidth) ~ 206 on H200.
    assert round(h200.peak_flops["bf16"] * 2 / (2 * h200.bandwidth_bytes_per_s)) == 206
    assert get_target("a100").supports(Format.INT8) and not get_target("a100").supports(Format.FP8)
    assert get_target("b200").supports(Format.NVFP4) and not h200.supports(Format.NVFP4)


def test_unknown_target_suggests():
    with pytest.raises(TargetError, match="did you mean 'h200'"):
        get_target("h20")


def test_fp8_refused_on_a100_with_reason_and_alternatives():
    with pytest.raises(TargetError) as e:
        load_and_plan(str(REPO / "recipes/smollm2-fp8-weight-rtn.yaml"), "a100")
    msg = str(e.value)
    assert "compute capability 8.9" in msg and "int8" in msg and "int4_weight_only" in msg
    assert "smollm2-fp8-weight-rtn.yaml" in msg and "quantize_rtn" in msg


@pytest.mark.parametrize("target", ["h200", "h100", "l40s", "l4", "b200", "cpu"])
def test_fp8_accepted_where_native(target):
    plan = load_and_plan(str(REPO / "recipes/smollm2-fp8-weight-rtn.yaml"), target)
    assert [p.name for p in plan.passes] == ["quantize_rtn", "export_checkpoint", "export_onnx"]


def test_plan_cli_refuses_fp8_a100_fast_without_torch():
    """`compress plan` must answer in under 2 s and must not even import torch (so no weights are loaded)."""
    code = ("import sys, time; t=time.perf_counter()\n"
            "from compressor.cli import main\n"
            f"rc = main(['plan', {str(REPO / 'recipes/smollm2-fp8-weight-rtn.yaml')!r}, '--target', 'a100'])\n"
            "print(rc, 'torch' in sys.modules, time.perf_counter()-t)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    rc, torch_loaded, _ = out.stdout.split()
    assert rc == "2" and torch_loaded == "False", out
    assert "no FP8 units before compute capability 8.9" in out.stderr
    assert wall < 2.0, f"plan took {wall:.2f} s"


def test_plan_prints_passes_verdicts_and_estimate():
    out = subprocess.run([sys.executable, "-m", "compressor", "plan", str(REPO / "recipes/quickstart.yaml"),
                          "--target", "h200", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [p["name"] for p in plan["passes"]] == ["quantize_rtn", "export_checkpoint", "export_onnx"]
    assert plan["verdicts"] == ["passes.0 (quantize_rtn): int8 is native on h200"]
    est = plan["estimate"]
    assert est["parameters"] == 134_515_008
    # Checkpoint + ONNX, each: 106.2M Linear weights at 1 byte + the fp32 embedding (28.3M x 4 bytes) = ~220 MB.
    # Measured: 220.2 MB + 228.1 MB.
    assert 420e6 < est["output_bytes"] < 460e6


def test_export_before_quantize_is_refused(tmp_path, tiny_model_dir):
    p = tmp_path / "r.yaml"
    p.write_text(f"""schema_version: 1
name: r
model: {{source: {tiny_model_dir}}}
passes:
  - pass: export_onnx
  - pass: quantize_rtn
    format: int8
""")
    with pytest.raises(RecipeError) as e:
        load_and_plan(str(p), "cpu")
    assert "r.yaml:6" in str(e.value) and "after export_onnx" in str(e.value)


def test_unknown_pass_suggests(tmp_path, tiny_model_dir):
    p = tmp_path / "r.yaml"
    p.write_text(f"schema_version: 1\nname: r\nmodel: {{source: {tiny_model_dir}}}\npasses:\n  - pass: quantize_rtm\n")
    with pytest.raises(RecipeError) as e:
        load_and_plan(str(p), "cpu")
    assert "r.yaml:5" in str(e.value) and "did you mean 'quantize_rtn'" in str(e.value)


def test_pass_config_errors_name_the_field(tmp_path, tiny_model_dir):
    p = tmp_path / "r.yaml"
    p.write_text(f"schema_version: 1\nname: r\nmodel: {{source: {tiny_model_dir}}}\npasses:\n"
                 "  - pass: quantize_rtn\n    format: int8\n    granularity: per_group\n    group_sise: 64\n")
    with pytest.raises(RecipeError) as e:
        load_and_plan(str(p), "cpu")
    assert "r.yaml:8" in str(e.value) and "passes.0.group_sise" in str(e.value)
    assert "unknown key 'group_sise'; did you mean 'group_size'?" in str(e.value)


@pytest.mark.parametrize("first,second,blocker", [
    ("{pass: quantize_rtn, format: int8}", "{pass: prune_structured, importance: magnitude, mlp_ratio: 0.25}",
     "quantize_rtn"),
    ("{pass: prune, method: magnitude, sparsity: 0.5}", "{pass: prune_structured, importance: magnitude, "
     "mlp_ratio: 0.25}", "prune"),
    ("{pass: quantize_rtn, format: int8}", "{pass: prune, method: magnitude, sparsity: 0.5}", "quantize_rtn"),
])
def test_pruning_after_quantization_is_refused_at_plan_time(tmp_path, tiny_model_dir, first, second, blocker):
    p = tmp_path / "r.yaml"
    p.write_text(f"schema_version: 1\nname: r\nmodel: {{source: {tiny_model_dir}}}\n"
                 f"passes:\n  - {first}\n  - {second}\n")
    with pytest.raises(RecipeError, match=rf"cannot run after {blocker} \(passes.0\)") as e:
        load_and_plan(str(p), "cpu")
    assert e.value.key == "passes.1" and e.value.line == 6


# Shipped recipes and a target each plans on (the name says where it is meant to run; b200 for NVFP4).
_SHIPPED_TARGET = {"smollm2-nvfp4": "b200", "smollm2-w4a16-deploy-cpu": "cpu", "quickstart": "cpu"}


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_plans(path):
    """Every recipe in recipes/ validates and plans (names, configs, order, legality) without loading weights."""
    plan = load_and_plan(str(path), _SHIPPED_TARGET.get(path.stem, "h200"))
    assert plan.recipe.name == path.stem and plan.passes
