"""Crash safety: SIGKILL the `compress` process at seeded random points of a real run on the tiny model.

Each trial kills a run during calibration, the ONNX export, the evaluation and report, or after a random delay
from the start. After every kill the output folder is absent or complete (never partial); the next run removes
the dead run's temporary sibling, finishes reusing the stages that were cached before the kill, and its
artifacts (checkpoint, ONNX, plot, report facts without timings) are byte-identical to an uninterrupted run's.
All trials share one cache until a run completes (or a trial aims at calibration, which runs only on a cache
miss); then the cache starts empty again, so later trials kill calibration and export again instead of copies
from the cache.

The default run does 3 trials; the `slow` loop does 20 (under 5 minutes on 2 cores).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from _rel_helpers import Watched, calibrated_recipe, complete, compress_cmd, env, fingerprint, run

# (phase, stderr line after which the kill delay starts, upper bound of the delay in seconds)
PHASES = [("calibration", "calibration samples x", 0.3),
          ("export", "export_onnx: exporting", 9.0),
          ("eval+report", "eval local: perplexity", 0.6),
          ("random", None, 25.0)]


def _reference(tmp_path_factory, model, text, onnx: bool):
    """An uninterrupted run (its own empty cache): what every finished trial must reproduce."""
    d = tmp_path_factory.mktemp("crash-ref")
    recipe = calibrated_recipe(d, model, text, onnx=onnx)
    out = d / "ref"
    r = run(recipe, out, d / "home")
    assert r.returncode == 0, r.stderr
    return recipe, out, fingerprint(out)


def _kill_loop(trials: int, seed: int, reference, tmp_path: Path, phases=PHASES) -> Counter:
    """`trials` runs into one output folder, each killed at a seeded point (or finishing); one cache until a run
    finishes. Every run after a kill is the rerun of the killed one: it reuses what was cached and, when it
    finishes, must match the reference byte for byte."""
    recipe, ref_out, ref_fp = reference
    rng = random.Random(seed)
    work = tmp_path / "w"
    out = work / "run"
    home = tmp_path / "home-0"
    stats: Counter = Counter()
    last = trials  # after the loop: one more run that is never killed
    for t in range(trials + 1):
        phase, marker, spread = (phases[t % len(phases)] if t < len(phases) else rng.choice(phases)) \
            if t < last else ("final", None, 1e9)
        delay = rng.uniform(0, spread) if t < last else 0.0
        if phase == "calibration" and t > 0:  # calibration runs only on a cache miss: start this one empty
            home = tmp_path / f"home-{t}"
        w = Watched(compress_cmd(recipe, out, "--overwrite"), env(home))
        reached = w.wait_for(marker) if marker else True
        if t < last:
            time.sleep(delay)
            if w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGKILL)
        rc, log = w.finish()
        killed = rc == -signal.SIGKILL
        where = f"trial {t} ({phase}, +{delay:.2f}s, marker reached: {reached})"
        # The invariant: no output folder, or a complete one.
        assert not out.exists() or complete(out, ref_out), f"{where}: partial output {sorted(out.rglob('*'))}"
        if "reusing cached result" in log or "reused from cache" in log:
            stats["runs_reusing_cache"] += 1
        if killed:
            stats["killed"] += 1
            stats[f"killed_in_{phase}"] += 1
            continue
        assert rc == 0, f"{where}: {log}"
        assert fingerprint(out) == ref_fp, f"{where}: artifacts differ from the uninterrupted run's"
        # the dead runs' temporary siblings, and their half-built cache entries, were removed by this one
        assert [p.name for p in work.iterdir()] == ["run"], f"{where}: left {list(work.iterdir())}"
        half_built = [p for p in (home / "cache").rglob(".*") if p.is_dir()]
        assert half_built == [], f"{where}: left {half_built}"
        stats["cache_entries_checked"] += sum(1 for _ in (home / "cache").glob("*/*/*/.complete"))
        stats["finished"] += 1
        home = tmp_path / f"home-{t + 1}"  # the next trial starts from an empty cache
    shutil.rmtree(tmp_path, ignore_errors=True)
    print(f"\nkill loop ({trials} trials, seed {seed}): {dict(sorted(stats.items()))}")
    return stats


def test_sigkill_three_trials(tmp_path_factory, tiny_model_dir, text_dir, tmp_path):
    """Calibration, export (checkpoint only: fast) and report killed once each, then a finishing rerun."""
    ref = _reference(tmp_path_factory, tiny_model_dir, text_dir, onnx=False)
    phases = [("calibration", "calibration samples x", 0.3), ("export", "pass export_checkpoint: start", 0.05),
              ("eval+report", "eval local: perplexity", 0.6)]
    stats = _kill_loop(3, seed=1, reference=ref, tmp_path=tmp_path, phases=phases)
    assert stats["killed"] >= 2 and stats["finished"] >= 1 and stats["runs_reusing_cache"] >= 1


@pytest.mark.slow
def test_sigkill_loop_twenty_trials(tmp_path_factory, tiny_model_dir, text_dir, tmp_path):
    ref = _reference(tmp_path_factory, tiny_model_dir, text_dir, onnx=True)
    stats = _kill_loop(20, seed=20261130, reference=ref, tmp_path=tmp_path)
    assert stats["killed"] + stats["finished"] == 21
    assert stats["killed"] >= 12 and stats["killed_in_calibration"] >= 2 and stats["killed_in_export"] >= 2
    assert stats["runs_reusing_cache"] >= 3 and stats["finished"] >= 2
