"""A local sweep on the tiny Llama: one report over every variant (frontier and cheapest passing marked), a
second sweep served from the cache, and a resumed sweep that skips the variants already finished."""

from __future__ import annotations

import json
import os

import pytest

from compressor.sweep import executors
from compressor.sweep.runner import run_sweep


def _by_name(report: dict) -> dict:
    return {v["name"]: v for v in report["variants"]}


def quality(m: dict) -> dict:
    """What a variant measured, without the run's own time and memory."""
    return {k: m[k] for k in ("perplexity", "kl_divergence", "top1_agreement", "eval_sets", "model_bytes",
                              "modeled", "intervals")}


def test_local_sweep_report_then_cached_rerun(sweep_recipe, tmp_path, home, capsys):
    from compressor.cli import main

    recipe = sweep_recipe()
    rc = main(["sweep", str(recipe), "--target", "h200", "--out", str(tmp_path / "a"), "-q"])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "a"
    report = json.loads((out / "report" / "report.json").read_text())
    v = _by_name(report)
    assert list(v) == ["int8", "int4-g32", "int4-g16", "nvfp4"]
    assert [x["status"] for x in v.values()] == ["ok", "gates_failed", "ok", "skipped"]
    assert "NVFP4 needs compute capability 10.0" in v["nvfp4"]["reason"] and "metrics" not in v["nvfp4"]
    # KL gate 1e-4: int8 (KL ~4e-7) and int4 g16 (~8e-5) pass, int4 g32 (~1.4e-4) fails
    assert [x.get("passed") for x in v.values()] == [True, False, True, None]
    assert v["int8"]["metrics"]["kl_divergence"] < 1e-5 < v["int4-g16"]["metrics"]["kl_divergence"] < 1e-4 \
        < v["int4-g32"]["metrics"]["kl_divergence"]
    # MODELED $/Mtok on h200 orders the variants by bytes: g32 < g16 (more scales) < int8
    assert v["int4-g32"]["cost"] < v["int4-g16"]["cost"] < v["int8"]["cost"]
    sw = report["sweep"]
    assert sw["variants_total"] == 4 and sw["ran"] == 3 and sw["resumed"] == 0 and len(sw["skipped"]) == 1
    # int4 g32 is cheapest and (on this random model) also the lowest perplexity: the only point on the front;
    # it fails the gate, so the cheapest variant that passes is int4 g16, which is the report's result
    assert sw["frontier"] == ["int4-g32"] and [n for n, x in v.items() if x["frontier"]] == ["int4-g32"]
    assert sw["cheapest_passing"] == "int4-g16" == sw["result"]
    assert [n for n, x in v.items() if x["cheapest_passing"]] == ["int4-g16"]
    assert report["result"]["metrics"] == v["int4-g16"]["metrics"]
    assert report["recipe"]["name"] == "tiny-sweep" and all(a["path"].startswith("variants/int4-g16/")
                                                              for a in report["artifacts"])
    for name in ("int8", "int4-g32", "int4-g16"):
        sub = json.loads((out / "variants" / name / "report" / "report.json").read_text())
        assert sub["recipe"]["name"] == name and sub["result"]["metrics"] == v[name]["metrics"]
    assert not (out / "variants" / "nvfp4").exists()
    md = (out / "report" / "report.md").read_text()
    assert "## Sweep" in md and "| `int4-g16` | ok |" in md and "**yes**" in md and "# Result: int4-g16" in md
    html = (out / "report" / "report.html").read_text()
    assert '<table class="sweep">' in html and "cheapest variant that passes every gate" in html
    assert (out / "report" / "pareto.png").stat().st_size > 10_000

    # The same sweep again, into another folder: every stage and every evaluation comes from the cache.
    rc = main(["sweep", str(recipe), "--target", "h200", "--out", str(tmp_path / "b"), "-q"])
    assert rc == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "b" / "report" / "report.json").read_text())
    w = _by_name(again)
    for name in ("int8", "int4-g32", "int4-g16"):
        assert quality(w[name]["metrics"]) == quality(v[name]["metrics"])
        sub = json.loads((tmp_path / "b" / "variants" / name / "report" / "report.json").read_text())
        assert all(p["cached"] for p in sub["passes"]), name
        assert set(w[name]["saved_by_kind"]) == {"stage", "eval"} and w[name]["seconds_saved"] > 0
    assert again["sweep"]["seconds_saved"] > 0 and again["sweep"]["saved_by_kind"]["eval"] > 0
    assert again["sweep"]["cheapest_passing"] == "int4-g16"

    # A gate no variant meets: exit 1, the result is then the variant with the lowest perplexity.
    rc = main(["sweep", str(recipe), "--target", "h200", "--out", str(tmp_path / "c"), "-q",
               "--set", "gates.0.max=1e-9"])
    assert rc == 1 and "no variant passes the gates" in capsys.readouterr().err
    failed = json.loads((tmp_path / "c" / "report" / "report.json").read_text())
    assert failed["sweep"]["cheapest_passing"] is None and failed["sweep"]["result"] == "int4-g32"


def test_interrupted_sweep_resumes_without_redoing_finished_variants(sweep_recipe, tmp_path, home, monkeypatch):
    recipe = sweep_recipe()
    out = tmp_path / "s"
    real, calls = executors.run_variant, []

    def interrupted(job):
        calls.append(job["name"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second variant runs
        return real(job)

    monkeypatch.setattr(executors, "run_variant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(recipe), "h200", out, quiet=True)
    assert (out / "variants" / "int8" / "report" / "report.json").is_file()
    assert not (out / "variants" / "int4-g32").exists() and not (out / "report").exists()
    monkeypatch.setattr(executors, "run_variant", real)

    s = run_sweep(str(recipe), "h200", out, quiet=True)
    sw = s.report["sweep"]
    assert s.exit_code == 0 and sw["resumed"] == 1 and sw["ran"] == 2
    v = _by_name(s.report)
    assert v["int8"]["resumed"] and not v["int4-g32"]["resumed"] and not v["int4-g16"]["resumed"]
    # int8 ran once, in the first sweep; its outcome came from OUT/sweep.json
    assert len((out / "variants" / ".int8.attempts").read_text().splitlines()) == 1
    assert v["int8"]["seconds"] > 0 and sw["resumed_seconds"] == v["int8"]["seconds"]
    assert sw["cheapest_passing"] == "int4-g16"
    # a third run has nothing left to do
    s3 = run_sweep(str(recipe), "h200", out, quiet=True)
    assert s3.report["sweep"]["ran"] == 0 and s3.report["sweep"]["resumed"] == 3
    assert quality(_by_name(s3.report)["int4-g16"]["metrics"]) == quality(v["int4-g16"]["metrics"])


def test_resume_refuses_a_variant_whose_recipe_changed(sweep_recipe, tmp_path, home, capsys):
    from compressor.cli import main
    from compressor.errors import InputError

    out = tmp_path / "s"
    out.mkdir()
    (out / "x").write_text("not a sweep")
    with pytest.raises(InputError, match="is not a sweep's"):
        run_sweep(str(sweep_recipe()), "h200", out)
    (out / "x").unlink()
    one = "  variants:\n    - {name: int4-g32, set: {passes.0.format: int4, passes.0.granularity: per_group, " \
          "passes.0.group_size: 32}}\n"
    assert run_sweep(str(sweep_recipe(one)), "h200", out, quiet=True).exit_code == 1  # KL gate fails
    # a variant added to the recipe runs; the finished one is kept (the report re-renders with both)
    two = one + "    - {name: int8, set: {passes.0.granularity: per_channel}}\n"
    s = run_sweep(str(sweep_recipe(two)), "h200", out, quiet=True)
    assert s.report["sweep"]["resumed"] == 1 and s.report["sweep"]["ran"] == 1 and s.exit_code == 0
    rc = main(["report", str(out)])
    assert rc == 0 and "## Sweep" in (out / "report" / "report.md").read_text()
    # the same name with another configuration is not silently reused
    with pytest.raises(InputError, match="int4-g32 finished with a different recipe or target"):
        run_sweep(str(sweep_recipe(two.replace("group_size: 32", "group_size: 16"))), "h200", out, quiet=True)
    with pytest.raises(InputError, match="int4-g32, int8 finished with a different recipe or target"):
        run_sweep(str(sweep_recipe(two)), "b200", out, quiet=True)


def test_schedule_runs_each_groups_first_variant_before_the_rest():
    jobs = [{"name": n, "group": g} for n, g in [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("b2", "B")]]
    log, inflight = [], []

    def start(j):
        log.append(("start", j["name"], sorted(inflight)))
        inflight.append(j["name"])
        return j["name"]

    def wait_one(handles):
        h = handles[0]  # the oldest finishes first
        inflight.remove(h)
        return h, {"ok": True}

    executors.schedule(jobs, 2, start, wait_one, lambda j, r: log.append(("done", j["name"])))
    # with two slots: the leaders a1 and b1 start together; a2/a3/b2 only after their leader finished
    assert log[:2] == [("start", "a1", []), ("start", "b1", ["a1"])]
    order = [e[1] for e in log]
    for leader, rest in (("a1", ["a2", "a3"]), ("b1", ["b2"])):
        done = log.index(("done", leader))
        assert all(log.index(next(e for e in log if e[:2] == ("start", r))) > done for r in rest)
    assert sorted(n for k, n, *_ in log if k == "done") == ["a1", "a2", "a3", "b1", "b2"] and len(order) == 10


def test_variants_sharing_calibration_statistics_compute_them_once_in_a_process_pool(sweep_recipe, text_dir,
                                                                                     tmp_path, home):
    """Two SmoothQuant strengths read the same per-channel activation maxima of the original model: with two
    processes, the second SmoothQuant variant waits for the first (its group's leader) and reads them from the
    cache, while the RTN variant (another group) runs beside the first."""
    sq = ("[{{pass: smoothquant, alpha: {a}}}, {{pass: quantize_rtn, format: int8, granularity: per_channel, "
          "activations: {{format: int8, dynamic: true}}}}]")
    recipe = sweep_recipe("  variants:\n"
                          f"    - {{name: sq-a05, passes: {sq.format(a=0.5)}}}\n"
                          f"    - {{name: sq-a08, passes: {sq.format(a=0.8)}}}\n"
                          "    - {name: int8, set: {passes.0.granularity: per_channel}}\n")
    recipe.write_text(recipe.read_text().replace("export: []", f"export: []\ncalibration:\n  source: {text_dir}\n"
                                                 "  num_samples: 8\n  seq_len: 64"))
    s = run_sweep(str(recipe), "h200", tmp_path / "s", parallel=2, quiet=True)
    v = _by_name(s.report)
    assert [x["status"] for x in v.values()] == ["ok", "ok", "ok"]
    assert "calib-stats" not in v["sq-a05"]["saved_by_kind"] and v["sq-a08"]["saved_by_kind"]["calib-stats"] > 0
    assert s.report["sweep"]["saved_by_kind"]["calib-stats"] == v["sq-a08"]["saved_by_kind"]["calib-stats"]
    pids = {n: int((tmp_path / "s" / "variants" / f".{n}.attempts").read_text().split()[0]) for n in v}
    assert os.getpid() not in pids.values()  # each variant ran in a pool process
    assert v["sq-a05"]["metrics"]["kl_divergence"] != v["sq-a08"]["metrics"]["kl_divergence"]
