"""Concurrency: runs and processes sharing one cache folder (COMPRESSOR_HOME) at once never corrupt it.

Cache entries are built in a private temporary folder and renamed into place (the loser of a race discards its
copy), so a reader sees a whole entry or none. Tested with 4 processes racing on the same keys through
`Cache.put`/`get`, and with two real `compress` runs started together on one cache.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import time
from pathlib import Path

from _rel_helpers import Watched, calibrated_recipe, compress_cmd, env, fingerprint, run


def _worker(root: str, wid: int, keys: int, errors) -> None:
    from compressor.cache import Cache

    cache = Cache(Path(root))
    rng = random.Random(wid)
    for i in rng.sample(range(keys), keys):
        key = f"{i:064x}"

        def build(d: Path, i=i) -> None:
            for part in range(3):  # a multi-file entry, written slowly: a reader must never see it half done
                (d / f"part{part}.bin").write_bytes(bytes([i % 251]) * (10_000 + 1000 * part))
                time.sleep(rng.uniform(0, 0.004))

        cache.put("race", key, build)
        for _ in range(3):
            j = rng.randrange(keys)
            hit = cache.get("race", f"{j:064x}")
            if hit is not None:
                for part in range(3):
                    data = (hit / f"part{part}.bin").read_bytes()
                    if data != bytes([j % 251]) * (10_000 + 1000 * part):
                        errors.put(f"worker {wid}: entry {j} part {part} has {len(data)} wrong bytes")
        cache.put_json("race-json", key, {"i": i, "by": "any"})


def test_processes_racing_on_the_same_keys(tmp_path):
    root = tmp_path / "cache"
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), w, 24, errors)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert errors.empty(), errors.get()
    entries = sorted((root / "race").glob("*/*"))
    assert len(entries) == 24  # one entry per key, whoever won
    for e in entries:
        i = int(e.name, 16)
        assert (e / ".complete").is_file()
        assert sorted(f.name for f in e.iterdir() if not f.name.startswith(".")) == ["part0.bin", "part1.bin",
                                                                                        "part2.bin"]
        assert (e / "part2.bin").read_bytes() == bytes([i % 251]) * 12_000
    assert len(list((root / "race-json").glob("*/*/value.json"))) == 24
    leftovers = [p for p in root.rglob(".*") if p.is_dir()]
    assert leftovers == []  # the losers' temporary folders were removed


def test_two_runs_share_one_cache_at_once(tiny_model_dir, text_dir, tmp_path):
    """Two `compress` runs of the same recipe on one cache, started together: both finish with byte-identical
    artifacts, the cache holds complete entries only, and a third run reuses every stage."""
    recipe = calibrated_recipe(tmp_path, tiny_model_dir, text_dir, onnx=False)
    home = tmp_path / "home"
    a = Watched(compress_cmd(recipe, tmp_path / "a"), env(home))
    b = Watched(compress_cmd(recipe, tmp_path / "b"), env(home))
    (ra, la), (rb, lb) = a.finish(), b.finish()
    assert ra == 0 and rb == 0, la + lb
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    cache = home / "cache"
    entries = [e for kind in cache.iterdir() if kind.is_dir() for e in kind.glob("*/*")]
    assert entries and all((e / ".complete").is_file() for e in entries if not e.name.startswith("."))
    assert [e for e in entries if e.name.startswith(".")] == []
    r = run(recipe, tmp_path / "c", home, "--json")
    assert r.returncode == 0, r.stderr
    assert "reusing cached result of quantize_gptq" in r.stderr and "export_checkpoint: reused from cache" in r.stderr
    assert all(p["cached"] for p in json.loads((tmp_path / "c" / "manifest.json").read_text())["passes"])
    assert fingerprint(tmp_path / "c") == fingerprint(tmp_path / "a")


def test_half_built_entries_of_dead_processes_are_removed(tmp_path):
    """A process killed while building an entry leaves `.KEY12.PID.*`; the next put into that folder removes it
    (a live process's build is left alone)."""
    import os

    from compressor.cache import Cache

    cache = Cache(tmp_path)
    key = "ab" + "0" * 62
    parent = tmp_path / "stage" / "ab"
    dead = parent / f".ab0000000000.{2**22 + 777}.x1"
    live = parent / f".ab0000000000.{os.getpid()}.x2"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    entry = cache.put("stage", key, lambda d: (d / "v").write_text("1"))
    assert not dead.exists() and live.is_dir()
    assert cache.get("stage", key) == entry and (entry / "v").read_text() == "1"


def test_two_runs_into_one_output_folder_keep_the_first(tmp_path):
    """Without --overwrite, a run that finds its output folder created by another run meanwhile keeps that one
    (complete) and discards its own, instead of silently replacing it."""
    import pytest

    from compressor.artifacts import atomic_output
    from compressor.errors import InputError

    out = tmp_path / "run"
    with pytest.raises(InputError, match="appeared while this run was going"):
        with atomic_output(out, overwrite=False) as mine:
            (mine / "manifest.json").write_text('{"run": "slow"}')
            with atomic_output(out, overwrite=False) as other:  # the other run starts later, finishes first
                (other / "manifest.json").write_text('{"run": "fast"}')
    assert json.loads((out / "manifest.json").read_text()) == {"run": "fast"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
