"""Sweeps on a real local Ray cluster started in the test process: the same metrics as the local executor, a
worker SIGKILLed mid-variant is retried and the sweep completes, and a Ray address that does not answer is a
one-line error within seconds (that one starts no cluster)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest

from compressor.sweep.runner import run_sweep


def quality(m: dict) -> dict:
    return {k: m[k] for k in ("perplexity", "kl_divergence", "top1_agreement", "eval_sets", "model_bytes", "modeled")}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_sweep_matches_the_local_sweep(ray_cluster, sweep_recipe, tmp_path, monkeypatch):
    recipe = sweep_recipe()
    monkeypatch.setenv("COMPRESSOR_HOME", str(tmp_path / "home-local"))
    local = run_sweep(str(recipe), "h200", tmp_path / "local", quiet=True)
    # A cache of its own, so the Ray workers compute every variant instead of reading the local run's results.
    monkeypatch.setenv("COMPRESSOR_HOME", str(tmp_path / "home-ray"))
    on_ray = run_sweep(str(recipe), "h200", tmp_path / "ray", executor="ray", parallel=2, quiet=True)
    assert on_ray.exit_code == local.exit_code == 0
    lv = {v["name"]: v for v in local.report["variants"]}
    rv = {v["name"]: v for v in on_ray.report["variants"]}
    assert list(rv) == list(lv) == ["int8", "int4-g32", "int4-g16", "nvfp4"]
    for name in ("int8", "int4-g32", "int4-g16"):
        assert quality(rv[name]["metrics"]) == quality(lv[name]["metrics"]), name
        assert rv[name]["attempts"] == 1 and rv[name]["saved_by_kind"] == {}  # computed, not reused
        sub = json.loads((tmp_path / "ray" / "variants" / name / "report" / "report.json").read_text())
        assert not any(p["cached"] for p in sub["passes"])
        # each ran in a Ray worker, not in this process
        pid = int((tmp_path / "ray" / "variants" / f".{name}.attempts").read_text().split()[0])
        assert pid != os.getpid()
    sw = on_ray.report["sweep"]
    assert sw["executor"] == "ray" and sw["ran"] == 3 and sw["cheapest_passing"] == "int4-g16"
    assert sw["frontier"] == local.report["sweep"]["frontier"] == ["int4-g32"]


@pytest.mark.ray
def test_worker_killed_mid_variant_is_retried(ray_cluster, sweep_recipe, tmp_path, home):
    out = tmp_path / "s"
    attempts = out / "variants" / ".int4-g32.attempts"
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if attempts.is_file() and attempts.read_text().strip():
                pid = int(attempts.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)  # the worker dies in the middle of the variant
                killed.append(pid)
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    s = run_sweep(str(sweep_recipe()), "h200", out, executor="ray", parallel=2, quiet=True)
    t.join(5)
    assert killed, "the variant never started"
    lines = attempts.read_text().splitlines()
    assert len(lines) == 2 and int(lines[1].split()[0]) != killed[0]
    v = {x["name"]: x for x in s.report["variants"]}
    assert v["int4-g32"]["status"] == "gates_failed" and v["int4-g32"]["attempts"] == 2
    assert [v[n]["attempts"] for n in ("int8", "int4-g16")] == [1, 1]
    assert s.exit_code == 0 and s.report["sweep"]["ran"] == 3 and s.report["sweep"]["cheapest_passing"] == "int4-g16"
    # nothing half-written is left beside the variants (the killed attempt's temporary folder was removed)
    assert sorted(p.name for p in (out / "variants").iterdir() if not p.name.endswith(".attempts")) == \
        ["int4-g16", "int4-g32", "int8"]


def test_dead_ray_address_fails_within_seconds(sweep_recipe, tmp_path, capsys):
    from compressor.cli import main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    rc = main(["sweep", str(sweep_recipe()), "--target", "h200", "--executor", "ray", "--ray-address",
               f"127.0.0.1:{port}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 10
    assert rc == 2 and f"Ray address 127.0.0.1:{port} does not answer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    rc = main(["sweep", str(sweep_recipe()), "--target", "h200", "--ray-address", "127.0.0.1:1"])
    assert rc == 2 and "--ray-address needs --executor ray" in capsys.readouterr().err
