"""Recipe fuzzing: arbitrary YAML and mutations of every shipped recipe give a plan or a one-line exit-2 error.

Every example goes through the real loader and planner (`load_and_plan`); a sample also through `compress plan`.
An error must be a RecipeError (or the target refusing a format, TargetError) naming the file and the line, and
for a mutated key the dotted key; anything else (a TypeError, a traceback, exit 3) is a bug in the loader.
The number of examples tried is printed (`pytest -s`) and asserted.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.errors import CompressorError, RecipeError, TargetError
from compressor.pipeline import load_and_plan

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TARGET = {"smollm2-nvfp4": "b200", "smollm2-w4a16-deploy-cpu": "cpu", "quickstart": "cpu"}
PER_RECIPE = int(os.environ.get("REL_FUZZ_PER_RECIPE", "30"))
COUNTS: Counter = Counter()

_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.filter_too_much])

# Values a hostile or careless recipe might hold: wrong types, huge and non-finite numbers, unicode, nesting.
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0]),
    st.text(max_size=12), st.sampled_from(["", "../x", "/etc/passwd", "ünïcödé-☃", "\u202e", "a" * 300, "0x10",
                                           "asset:nope", "int4", "per_group", "quantize_rtn", "2:4", "~", "."]),
)
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                      max_leaves=8)
keys = st.one_of(st.text(max_size=10), st.sampled_from(["pass", "format", "name", "source", "metric", "max",
                                                         "num_windows", "seq_len", "ünï", "__class__", "<<"]))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def _mutate(data, draw) -> tuple[dict, str]:
    """One mutation at a random place: delete, replace (any type), rename the key, or insert a key."""
    data = copy.deepcopy(data)
    paths = [p for p in _paths(data) if p]
    shallow = [p for p in paths if len(p) <= 2]  # whole sections and their keys, as often as any deep value
    path = draw(st.one_of(st.sampled_from(shallow), st.sampled_from(paths)))
    parent, last = _get(data, path[:-1]), path[-1]
    op = draw(st.sampled_from(["delete", "replace", "replace", "rename", "insert", "retype"]))
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = draw(values)
    elif op == "retype":  # same value, another type: "8" for 8, [x] for x, {value: x}
        v = parent[last]
        parent[last] = draw(st.sampled_from([str(v), [v], {"value": v}, repr(v).encode().hex()]))
    elif op == "rename" and isinstance(parent, dict):
        parent[draw(keys)] = parent.pop(last)
    elif op == "insert":
        target = _get(data, path) if isinstance(_get(data, path), dict) else parent
        if isinstance(target, dict):
            target[draw(keys)] = draw(values)
        else:
            target.append(draw(values))
    return data, f"{op} {'.'.join(map(str, path))}"


def _check(path: Path, target: str, where: str, need_key: bool = False) -> str:
    """Plan the recipe at `path`: a Plan, or a CompressorError of exit code 2 that names the file and line (and
    the dotted key when `need_key`: a mutation inside a valid YAML mapping)."""
    try:
        load_and_plan(str(path), target)
    except RecipeError as e:
        msg = str(e)
        assert e.exit_code == 2 and e.file == str(path), (where, msg)
        assert e.line is not None, (where, msg)
        assert "\n" not in msg, (where, msg)
        assert e.key or not need_key, (where, msg)
        return "recipe_error"
    except TargetError as e:
        assert str(path) in str(e) and "\n" not in str(e), (where, str(e))
        return "target_error"
    except CompressorError as e:  # another kind of error with exit 2 would be acceptable, but none is expected
        pytest.fail(f"{where}: {type(e).__name__} (exit {e.exit_code}) instead of a RecipeError: {e}")
    return "plan"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_mutated_shipped_recipes_plan_or_fail_cleanly(recipe, tmp_path):
    original = yaml.safe_load(recipe.read_text())
    target = TARGET.get(recipe.stem, "h200")
    out = tmp_path / recipe.name
    tried: Counter = Counter()

    @settings(max_examples=PER_RECIPE, **_SETTINGS)
    @given(st.data())
    def fuzz(data):
        mutated, what = _mutate(original, data.draw)
        text = yaml.safe_dump(mutated, allow_unicode=True, sort_keys=False)
        out.write_text(text, encoding="utf-8")
        tried[_check(out, target, f"{recipe.name}: {what}", need_key=True)] += 1

    fuzz()
    COUNTS.update({f"mutation:{k}": v for k, v in tried.items()})
    COUNTS["recipes"] += 1
    print(f"{recipe.stem}: {sum(tried.values())} mutations, {dict(tried)}")
    assert sum(tried.values()) >= min(PER_RECIPE, 10)
    assert tried["recipe_error"] > 0  # the fuzzer does reach the validators


def test_mutations_name_the_key(tmp_path):
    """Deleting or retyping a required key of the quickstart recipe names that key and its line."""
    src = REPO / "recipes" / "quickstart.yaml"
    data = yaml.safe_load(src.read_text())
    p = tmp_path / "q.yaml"
    cases = [(("passes", 0, "format"), "int9", "passes.0.format"),
             (("eval", "num_windows"), -3, "eval.num_windows"),
             (("eval", "num_windows"), 10**30, None),
             (("model", "dtype"), ["float32"], "model.dtype"),
             (("eval", "latency", "repetitions"), math.nan, "eval.latency.repetitions"),
             (("seed",), 2**70, "seed"),
             (("eval", "batch_sizes"), [0], "eval.batch_sizes.0"),
             (("passes",), 1, "passes"),  # was a TypeError traceback (paths resolved before validation)
             (("export",), True, "export"),
             (("name",), "../../escape", "name")]
    for path, value, key in cases:
        d = copy.deepcopy(data)
        _get(d, path[:-1])[path[-1]] = value
        p.write_text(yaml.safe_dump(d, allow_unicode=True, sort_keys=False))
        with pytest.raises(RecipeError) as e:
            load_and_plan(str(p), "cpu")
        assert e.value.line is not None and e.value.key == (key or ".".join(map(str, path))), str(e.value)
        COUNTS["named_key_cases"] += 1


@settings(max_examples=int(os.environ.get("REL_FUZZ_DOCS", "300")), **_SETTINGS)
@given(doc=st.one_of(values, st.dictionaries(keys, values, max_size=6),
                     st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
                     st.lists(st.sampled_from(["schema_version: 1", "name: x", "model:", "  source: .", "passes:",
                                               "  - pass: quantize_rtn", "- [", "{", "key: [1, 2", "\t- x",
                                               "!!binary x", "&a [*a]", "<<: *b", "eval:", "  datasets: []",
                                               "---", "...", "%YAML 1.1", "? complex"]), max_size=8),
                     st.binary(max_size=40)))
def test_arbitrary_yaml_documents(doc, tmp_path_factory):
    p = tmp_path_factory.getbasetemp() / "arbitrary.yaml"
    if isinstance(doc, list) and all(isinstance(x, str) for x in doc) and doc and ":" in "".join(doc):
        text = "\n".join(doc)
    elif isinstance(doc, (str, bytes)):
        text = doc
    else:
        text = yaml.safe_dump(doc, allow_unicode=True)
    p.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    COUNTS["documents:" + _check(p, "cpu", f"arbitrary document {text[:200]!r}")] += 1


@pytest.mark.parametrize("payload", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "!!python/name:os.system",
    "!!python/object:pathlib.Path {{}}",
])
def test_python_tags_are_rejected_and_never_run(payload, tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f"schema_version: 1\nname: evil\nmodel:\n  source: {payload.format(marker=marker)}\n")
    with pytest.raises(RecipeError, match=r"evil.yaml:4: not valid YAML: could not determine a constructor") as e:
        load_and_plan(str(p), "cpu")
    assert e.value.line == 4
    # also inside a --set value
    q = REPO / "recipes" / "quickstart.yaml"
    with pytest.raises(RecipeError, match="not valid YAML|constructor"):
        load_and_plan(str(q), "cpu", [f"name={payload.format(marker=marker)}"])
    assert not marker.exists()
    COUNTS["python_tags"] += 1


def test_cli_plan_on_mutations_exits_0_or_2_with_one_line(tmp_path):
    """A sample of mutations through the real `compress plan` process: exit 0 or 2, never a traceback."""
    import random

    rng = random.Random(7)
    rcs: Counter = Counter()
    for i in range(6):
        recipe = RECIPES[rng.randrange(len(RECIPES))]
        data = yaml.safe_load(recipe.read_text())
        paths = [p for p in _paths(data) if p]
        path = paths[rng.randrange(len(paths))]
        _get(data, path[:-1])[path[-1]] = rng.choice([None, "ünï☃", -1, 2**80, [[]], {"x": 1}, float("inf")])
        p = tmp_path / f"m{i}.yaml"
        p.write_text(yaml.safe_dump(data, allow_unicode=True))
        r = subprocess.run([sys.executable, "-m", "compressor", "plan", str(p), "--target",
                            TARGET.get(recipe.stem, "h200")], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode in (0, 2), r.stderr
        assert "Traceback" not in r.stderr
        if r.returncode == 2:
            assert len(r.stderr.strip().splitlines()) == 1 and f"{p}:" in r.stderr, r.stderr
        rcs[r.returncode] += 1
    COUNTS.update({f"cli_plan_exit_{k}": v for k, v in rcs.items()})
    assert sum(rcs.values()) == 6


_SET_KEYS = st.one_of(st.sampled_from(["name", "seed", "model.source", "model.dtype", "passes.0.format", "passes.0",
                                       "passes.9.format", "passes", "eval.num_windows", "eval.datasets.0.name",
                                       "eval.latency.enabled", "gates.0.max", "export.1.opset", "schema_version",
                                       "model.source.x", "eval..x", ".", "passes.-1.format", "passes.0.format.x"]),
                      st.text(max_size=15))


@settings(max_examples=int(os.environ.get("REL_FUZZ_SETS", "150")), **_SETTINGS)
@given(key=_SET_KEYS, value=st.one_of(st.text(max_size=20), st.sampled_from(["[1, 2", "{a: 1}", "!!python/name:os.system",
                                                                           "1e999", "-1", "null", "~", "int4"])))
def test_set_overrides(key, value):
    """`--set KEY=VALUE` with arbitrary keys and values: a plan, or a RecipeError naming --set or the key."""
    expr = f"{key}={value}"
    try:
        load_and_plan(str(REPO / "recipes" / "quickstart.yaml"), "cpu", [expr])
        COUNTS["set:plan"] += 1
    except RecipeError as e:
        assert e.exit_code == 2 and "\n" not in str(e), (expr, str(e))
        assert e.file in ("--set", str(REPO / "recipes" / "quickstart.yaml")), (expr, str(e))
        COUNTS["set:recipe_error"] += 1
    except TargetError:
        COUNTS["set:target_error"] += 1


def test_zz_print_counts():
    """Runs last in this file: the counts for the report."""
    print("\nrecipe fuzzing counts:", dict(sorted(COUNTS.items())))
