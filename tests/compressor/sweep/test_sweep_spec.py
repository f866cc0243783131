"""The `sweep:` section: expansion into variants, and the errors that name the sweep key (exit 2)."""

from __future__ import annotations

import re

import pytest

from compressor.errors import RecipeError
from compressor.sweep.runner import plan_sweep
from compressor.sweep.spec import SweepSpec, expand


def test_grid_is_a_cartesian_product_named_by_values():
    spec = SweepSpec(grid={"passes.0.format": ["int8", "int4"], "passes.0.group_size": [32, 64, 128]})
    vs = expand(spec)
    assert len(vs) == 6
    assert [v.name for v in vs[:3]] == ["format-int8_group_size-32", "format-int8_group_size-64",
                                        "format-int8_group_size-128"]
    assert vs[4].overrides == {"passes.0.format": "int4", "passes.0.group_size": 64}
    assert vs[4].set_args() == ['passes.0.format="int4"', "passes.0.group_size=64", f"name={vs[4].name}"]


def test_named_variants_crossed_with_grid_and_ambiguous_labels():
    spec = SweepSpec(grid={"passes.0.group_size": [32], "passes.1.group_size": [64, 128]},
                     variants=[{"name": "a", "set": {"passes.0.format": "int4"}},
                               {"name": "b", "passes": [{"pass": "quantize_rtn"}]}])
    vs = expand(spec)
    assert [v.name for v in vs] == ["a_0-group_size-32_1-group_size-64", "a_0-group_size-32_1-group_size-128",
                                    "b_0-group_size-32_1-group_size-64", "b_0-group_size-32_1-group_size-128"]
    # replacement passes are applied first, the grid on top
    assert list(vs[2].overrides) == ["passes", "passes.0.group_size", "passes.1.group_size"]
    assert vs[2].origin["passes"] == ("sweep", "variants", 1, "passes")


def _error(recipe) -> RecipeError:
    with pytest.raises(RecipeError) as e:
        plan_sweep(str(recipe), "h200")
    return e.value


@pytest.mark.parametrize("sweep, key, line, match", [
    ("  grid: {}\n", "sweep.grid", 19, "the grid is empty"),
    ("  grid:\n    passes.0.group_size: []\n", "sweep.grid.passes.0.group_size", 20, "at least 1 item"),
    ("  variants: [{name: a}, {name: a}]\n", "sweep.variants", 19, r"unique, repeated: \['a'\]"),
    ("  gird: {passes.0.format: [int4]}\n", "sweep.gird", 19, "unknown key 'gird'; did you mean 'grid'"),
    ("  grid:\n    passes.0.formt: [int4, int8]\n", "sweep.grid.passes.0.formt", 20,
     "variant formt-int4: unknown key 'formt'; did you mean 'format'"),
    ("  variants:\n    - {name: x, set: {passes.3.format: int4}}\n", "sweep.variants.0.set.passes.3.format", 20,
     "variant x: index '3' is out of range"),
    ("  variants:\n    - {name: x, set: {name: y}}\n", "sweep.variants.0.set", 20, "cannot change the recipe's name"),
    ("  {}\n", "sweep", 18, "needs `grid:` and/or `variants:`"),
])
def test_bad_sweep_sections_name_file_line_and_key(sweep_recipe, sweep, key, line, match):
    e = _error(sweep_recipe(sweep))
    # (a key holding dots may be quoted: sweep.grid.'passes.0.formt')
    assert e.key.replace("'", "") == key and e.line == line and e.file.endswith("sweep.yaml"), (e.key, e.line, str(e))
    assert e.exit_code == 2
    assert re.search(match, str(e)), str(e)


def test_grid_names_that_collide_are_an_error(sweep_recipe):
    e = _error(sweep_recipe("  grid:\n    passes.0.format: ['a b', 'a-b']\n"))
    assert e.key == "sweep" and "share a name" in str(e)


def test_illegal_and_invalid_variants_are_planned_as_skipped_with_the_reason(sweep_recipe):
    plan = plan_sweep(str(sweep_recipe()), "h200")
    assert [(v.name, v.status) for v in plan.variants] == [("int8", "run"), ("int4-g32", "run"),
                                                           ("int4-g16", "run"), ("nvfp4", "skipped")]
    assert "illegal on h200" in plan.variants[3].reason and "NVFP4 needs compute capability 10.0" in \
        plan.variants[3].reason
    # the same variant is legal on b200; a combination the pass's config refuses is skipped with its message
    assert all(v.status == "run" for v in plan_sweep(str(sweep_recipe()), "b200").variants)
    bad = sweep_recipe("  variants:\n    - {name: ok, set: {passes.0.format: int8}}\n"
                       "    - {name: g0, set: {passes.0.granularity: per_group, passes.0.group_size: 0}}\n")
    plan = plan_sweep(str(bad), "h200")
    assert plan.variants[1].status == "skipped" and plan.variants[1].reason.startswith("refused by the plan:")
    assert "group_size" in plan.variants[1].reason


def test_no_sweep_section_and_nothing_runnable(sweep_recipe, tmp_path, capsys):
    from compressor.cli import main

    p = sweep_recipe()
    p.write_text(p.read_text().split("sweep:")[0])
    assert _error(p).key == "sweep"
    only_bad = sweep_recipe("  variants:\n    - {name: nvfp4, set: {passes.0.format: nvfp4}}\n")
    rc = main(["sweep", str(only_bad), "--target", "h200", "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2 and "no variant of the sweep can run on h200" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
