"""Recipe validation: every bad input names the file, the line and the key."""

from __future__ import annotations

import pytest

from compressor.errors import RecipeError
from compressor.recipe import load_recipe

GOOD = """\
schema_version: 1
name: r
model:
  source: {model}
passes:
  - pass: quantize_rtn
    format: int8
export:
  - pass: export_checkpoint
"""


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_good_recipe_validates(tmp_path, tiny_model_dir):
    r, lines = load_recipe(_write(tmp_path, GOOD.format(model=tiny_model_dir)))
    assert r.name == "r" and r.passes[0].name == "quantize_rtn" and r.passes[0].options == {"format": "int8"}
    assert r.passes[0].line == 6 and r.export[0].line == 9


def test_unknown_key_names_file_line_key_and_suggests(tmp_path, tiny_model_dir):
    text = GOOD.format(model=tiny_model_dir).replace("  source:", "  sourse:")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    msg = str(e.value)
    assert "r.yaml:4" in msg and "model.sourse" in msg and "did you mean 'source'" in msg


def test_wrong_type_names_line(tmp_path, tiny_model_dir):
    text = GOOD.format(model=tiny_model_dir) + "eval:\n  datasets: [{name: a, source: " + str(tiny_model_dir) + "}]\n  num_windows: many\n"
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    assert "r.yaml:12" in str(e.value) and "eval.num_windows" in str(e.value)


def test_missing_model_path(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, GOOD.format(model="./no/such/model")))
    assert "r.yaml:4" in str(e.value) and "model.source" in str(e.value) and "not found" in str(e.value)


def test_unknown_asset_suggests(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, GOOD.format(model="asset:smollm2-135")))
    assert "did you mean 'asset:smollm2-135m'" in str(e.value)


def test_python_tags_are_rejected(tmp_path):
    text = "schema_version: 1\nname: x\nmodel: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    assert "r.yaml:3" in str(e.value) and "not valid YAML" in str(e.value)


def test_schema_version_required(tmp_path, tiny_model_dir):
    text = GOOD.format(model=tiny_model_dir).replace("schema_version: 1", "schema_version: 2")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    assert "schema_version" in str(e.value) and "r.yaml:1" in str(e.value)


def test_set_overrides_are_validated(tmp_path, tiny_model_dir):
    p = _write(tmp_path, GOOD.format(model=tiny_model_dir))
    r, _ = load_recipe(p, ["passes.0.format=int4", "seed=7"])
    assert r.passes[0].options["format"] == "int4" and r.seed == 7
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["seed=notanumber"])
    assert "seed" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["passes.5.format=int4"])
    assert "--set" in str(e.value) and "out of range" in str(e.value)
    with pytest.raises(RecipeError):
        load_recipe(p, ["novalue"])


def test_relative_paths_resolve_against_recipe_folder(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    p = _write(tmp_path, GOOD.format(model="m"))
    monkeypatch.chdir("/")
    r, _ = load_recipe(p)
    assert r.model.source == str(tmp_path / "m")


def test_gate_needs_exactly_one_kind(tmp_path, tiny_model_dir):
    text = GOOD.format(model=tiny_model_dir) + (
        f"eval:\n  datasets: [{{name: a, source: {tiny_model_dir}}}]\ngates:\n  - {{metric: perplexity, max: 3, min: 1}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    assert "exactly one" in str(e.value) and "gates.0" in str(e.value)


def test_unknown_gate_metric_suggests(tmp_path, tiny_model_dir):
    text = GOOD.format(model=tiny_model_dir) + (
        f"eval:\n  datasets: [{{name: a, source: {tiny_model_dir}}}]\ngates:\n  - {{metric: perplexty, max: 3}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    assert "did you mean 'perplexity'" in str(e.value)


@pytest.mark.parametrize("gate, message", [
    ("{metric: accuracy, max_decrease: 0.02}", "task accuracy is measured only with eval.tasks or eval.lm_eval"),
    ("{metric: embedding_cosine, max_decrease_pct: 1}", "measured against the baseline"),
    ("{metric: model_bytes, max: 1.0e9, confidence: 0.95}", "has none"),
])
def test_gates_on_metrics_the_run_cannot_judge_are_refused(tmp_path, tiny_model_dir, gate, message):
    text = GOOD.format(model=tiny_model_dir) + (
        f"eval:\n  datasets: [{{name: a, source: {tiny_model_dir}}}]\ngates:\n  - {gate}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    assert message in str(e.value) and "gates.0" in str(e.value) and "r.yaml" in str(e.value)


def test_accuracy_gate_at_a_confidence_is_accepted_with_a_task(tmp_path, tiny_model_dir):
    text = GOOD.format(model=tiny_model_dir) + (
        f"eval:\n  datasets: [{{name: a, source: {tiny_model_dir}}}]\n"
        f"  tasks: [{{name: t, source: {tiny_model_dir}, num_items: 20}}]\n"
        "gates:\n  - {metric: accuracy, max_decrease: 0.05, confidence: 0.9}\n")
    r, _ = load_recipe(_write(tmp_path, text))
    assert r.gates[0].confidence == 0.9 and r.eval.tasks[0].name == "t"
