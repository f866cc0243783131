"""Bad gate and eval input is refused when the recipe is read: one line naming the file, the line and the key."""

from __future__ import annotations

import pytest

from compressor.errors import RecipeError
from compressor.recipe import load_recipe
from tests.conftest import run_cli

RECIPE = """\
schema_version: 1
name: r
model: {{source: {model}}}
passes:
  - {{pass: quantize_rtn, format: int8}}
export: {export}
eval:
  datasets: [{{name: local, source: {text}}}]
  num_windows: {windows}
  seq_len: 64
  latency: {{enabled: {latency}}}
{eval_extra}
gates:
  - {{metric: perplexity, max_increase_pct: 5}}
  - {gate}
"""


def _recipe(tmp_path, tiny_model_dir, text_dir, gate="{metric: perplexity, max: 1000}", export="[]", windows=4,
            latency="false", eval_extra=""):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(model=tiny_model_dir, text=text_dir, gate=gate, export=export, windows=windows,
                               latency=latency, eval_extra=eval_extra))
    return p


def test_confidence_gate_and_eval_settings_load(tmp_path, tiny_model_dir, text_dir):
    r, _ = load_recipe(_recipe(tmp_path, tiny_model_dir, text_dir,
                               gate="{metric: perplexity, max_increase_pct: 2, confidence: 0.95}",
                               eval_extra="  intervals: {level: 0.9, resamples: 500, seed: 3}\n  usd_per_hour: 3.9"))
    assert r.gates[1].confidence == 0.95 and r.gates[1].kind == "max_increase_pct" and r.gates[1].limit == 2
    assert (r.eval.intervals.level, r.eval.intervals.resamples, r.eval.intervals.seed) == (0.9, 500, 3)
    assert r.eval.usd_per_hour == 3.9
    r, _ = load_recipe(_recipe(tmp_path, tiny_model_dir, text_dir))
    assert (r.eval.intervals.level, r.eval.intervals.resamples, r.eval.intervals.seed) == (0.95, 2000, None)
    assert r.eval.usd_per_hour is None


BAD = {
    "confidence on a metric without windows": (
        dict(gate="{metric: model_bytes, max: 1000000, confidence: 0.95}"), "gates.1",
        "confidence needs a metric with a bootstrap interval"),
    "change of a metric measured against the baseline": (
        dict(gate="{metric: kl_divergence, max_increase: 0.1}"), "gates.1",
        "kl_divergence is measured against the baseline"),
    "eval_set on a cost metric": (
        dict(gate="{metric: model_bytes, max: 10, eval_set: local}"), "gates.1", "eval_set applies to"),
    "latency gate, latency off": (
        dict(gate="{metric: latency_ms_decode, max: 10}", export="[{pass: export_onnx}]"), "gates.1",
        "latency is not measured (eval.latency.enabled is false)"),
    "latency gate, no ONNX export": (
        dict(gate="{metric: tokens_per_s, min: 10}", latency="true"), "gates.1",
        "this recipe exports none; add {pass: export_onnx} to export:"),
    "confidence over one window": (
        dict(gate="{metric: perplexity, max: 1000, confidence: 0.9}", windows=1), "gates.1",
        "needs eval.num_windows >= 2 (got 1)"),
    "confidence out of range": (dict(gate="{metric: perplexity, max: 1000, confidence: 95}"), "gates.1.confidence",
                                "less than 1"),
    "negative price": (dict(eval_extra="  usd_per_hour: -2"), "eval.usd_per_hour", "greater than 0"),
    "zero price": (dict(eval_extra="  usd_per_hour: 0"), "eval.usd_per_hour", "greater than 0"),
    "price not a number": (dict(eval_extra="  usd_per_hour: cheap"), "eval.usd_per_hour", "valid number"),
    "price NaN": (dict(eval_extra="  usd_per_hour: .nan"), "eval.usd_per_hour", "finite number"),
    "interval level": (dict(eval_extra="  intervals: {level: 1.5}"), "eval.intervals.level", "less than 1"),
    "unknown interval key": (dict(eval_extra="  intervals: {levle: 0.9}"), "eval.intervals.levle",
                             "did you mean 'level'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gate_or_eval_input(case, tmp_path, tiny_model_dir, text_dir):
    kwargs, key, expected = BAD[case]
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, tiny_model_dir, text_dir, **kwargs))
    msg = str(e.value)
    assert expected in msg and key in msg and "r.yaml:" in msg and "\n" not in msg, msg


def test_plan_refuses_gate_on_uncomputed_metric_in_one_line(tmp_path, tiny_model_dir, text_dir, capsys):
    recipe = _recipe(tmp_path, tiny_model_dir, text_dir, gate="{metric: latency_ms_decode, max: 10}")
    rc, _, err = run_cli(["plan", recipe, "--target", "cpu"], capsys)
    assert rc == 2 and "r.yaml:15" in err and "gates.1" in err and len(err.strip().splitlines()) == 1, err


def test_eval_set_smaller_than_one_window_names_the_set(tmp_path, tiny_model_dir, home, capsys):
    from tests.conftest import make_text

    small = tmp_path / "small"
    small.mkdir()
    for i in range(20):
        (small / f"{i}.txt").write_text(make_text(12, i))
    recipe = _recipe(tmp_path, tiny_model_dir, small)
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "o", "--quiet"], capsys)
    assert rc == 2 and "eval set 'local': eval data" in err and "need 4 x 64 = 256" in err, err
    # One error line (transformers' weight-loading bar may print above it).
    assert [ln for ln in err.splitlines() if "error" in ln] == [err.strip().splitlines()[-1]]
    assert not (tmp_path / "o").exists()
