"""Where the variants of a sweep run. Every variant is one call of `run_variant` (the same `run_recipe` as
`compress RECIPE`), in this process, in a pool of processes, or as a Ray task; `schedule` feeds them with
bounded parallelism and runs the first variant of each shared-work group (same model, calibration and first
pass) before the others of its group, so the statistics they share are computed once and then read from the
cache.

Ray (`--executor ray`, extra `compressor[ray]`): `ray.init(address)` or a local cluster; each variant is a
`ray.remote` task with `max_retries`, so a worker killed mid-variant is run again (its half-written output
folder is a temporary one, removed by the next attempt). Workers must see the recipe, OUT and
$COMPRESSOR_HOME at the same paths (one machine, or a shared filesystem).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Callable

from compressor.errors import CompressorError, InputError, MissingDependency

# Environment a worker needs to find the same cache, assets and offline settings as the driver.
ENV_KEYS = ("COMPRESSOR_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
            "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
RAY_MAX_RETRIES = 3


def job_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ENV_KEYS if k in os.environ}


def attempts_file(variants_dir: Path, name: str) -> Path:
    """One line per attempt at a variant: the process id and host that ran it (a retried variant has several)."""
    return Path(variants_dir) / f".{name}.attempts"


def run_variant(job: dict) -> dict:
    """Run one variant into job["variants_dir"]/<name>. Never raises: the outcome is in the returned dict
    {name, status: ok | gates_failed | error, error, exit_code, seconds, saved: {kind: seconds}, attempts}."""
    from compressor import cache

    for k, v in job.get("env", {}).items():
        os.environ[k] = v
    vdir, name = Path(job["variants_dir"]), job["name"]
    vdir.mkdir(parents=True, exist_ok=True)
    with open(attempts_file(vdir, name), "a") as f:
        f.write(f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n")
    for stale in glob.glob(str(vdir / f".{glob.escape(name)}.partial-*")):  # left by a killed attempt
        shutil.rmtree(stale, ignore_errors=True)
    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))
    from compressor.errors import GateFailed
    from compressor.pipeline import run_recipe

    start, t0 = cache.ledger_len(), time.perf_counter()
    out = {"name": name, "status": "ok", "error": None, "exit_code": 0}
    try:
        run_recipe(job["recipe"], job["target"], vdir / name, overrides=job["overrides"],
                   model_override=job.get("model_override"), quiet=job.get("quiet", True),
                   use_cache=job.get("use_cache", True))
    except GateFailed:
        out["status"] = "gates_failed"
    except CompressorError as e:
        out.update(status="error", error=str(e), exit_code=e.exit_code)
    except Exception as e:  # noqa: BLE001 - a bug in one variant must not hide the others' results
        out.update(status="error", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}", exit_code=3)
    saved: dict[str, float] = {}
    for kind, _, secs in cache.ledger(start):
        saved[kind] = round(saved.get(kind, 0.0) + secs, 3)
    n = len(attempts_file(vdir, name).read_text().splitlines())
    return out | {"seconds": round(time.perf_counter() - t0, 3), "saved": saved, "attempts": n}


def schedule(jobs: list[dict], parallel: int, start: Callable[[dict], object],
             wait_one: Callable[[list], tuple[object, dict]], on_done: Callable[[dict, dict], None]) -> None:
    """Run `jobs` with at most `parallel` in flight; the first job of each `group` runs before the rest of it."""
    leader: dict[str, str] = {}
    for j in jobs:
        leader.setdefault(j["group"], j["name"])
    pending, inflight, ready_groups = list(jobs), {}, set()
    while pending or inflight:
        while pending and len(inflight) < max(1, parallel):
            j = next((j for j in pending if j["group"] in ready_groups or leader[j["group"]] == j["name"]), None)
            if j is None:
                break
            pending.remove(j)
            inflight[start(j)] = j
        handle, result = wait_one(list(inflight))
        j = inflight.pop(handle)
        ready_groups.add(j["group"])
        on_done(j, result)


def run_local(jobs: list[dict], parallel: int, on_done) -> None:
    """parallel 1: one after another in this process; more: a pool of fresh processes (spawned)."""
    if parallel <= 1:
        results = {}

        def start(j):
            results[j["name"]] = run_variant(j)
            return j["name"]

        schedule(jobs, 1, start, lambda names: (names[0], results.pop(names[0])), on_done)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=parallel, mp_context=mp.get_context("spawn")) as pool:
        def wait_one(futs):
            done, _ = wait(futs, return_when=FIRST_COMPLETED)
            f = next(iter(done))
            try:
                return f, f.result()
            except Exception as e:  # noqa: BLE001 - a worker process that died
                return f, {"status": "error", "error": f"worker process failed: {type(e).__name__}: {e}",
                           "exit_code": 3, "seconds": 0.0, "saved": {}, "attempts": 1}

        schedule(jobs, parallel, lambda j: pool.submit(run_variant, j), wait_one, on_done)


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """A host:port that does not accept a TCP connection within `timeout` is an InputError (exit 2) at once,
    instead of ray.init waiting on it."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray-address {address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"Ray address {address} does not answer ({type(e).__name__}: {e or 'timed out'} within "
                         f"{timeout:g} s); start the cluster (ray start --head) or leave out --ray-address to run "
                         "a local one") from None


def run_ray(jobs: list[dict], parallel: int, on_done, address: str | None = None,
            max_retries: int = RAY_MAX_RETRIES) -> None:
    """Each variant a Ray task (retried up to `max_retries` times if its worker dies), `parallel` in flight."""
    try:
        import ray
    except ImportError:
        raise MissingDependency("ray", "compress sweep --executor ray", 'pip install "compressor[ray]"') from None
    if address:
        check_ray_address(address)
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=max(1, parallel), include_dashboard=False, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - one line naming the address, not Ray's traceback
            where = f"at {address}" if address else "(local cluster)"
            raise InputError(f"could not start or join the Ray cluster {where}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=max_retries)(run_variant)

        def wait_one(refs):
            ready, _ = ray.wait(refs, num_returns=1)
            try:
                return ready[0], ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - retries exhausted, or the task could not run at all
                return ready[0], {"status": "error", "error": f"Ray task failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}", "exit_code": 3, "seconds": 0.0,
                                  "saved": {}, "attempts": max_retries + 1}

        schedule(jobs, parallel, lambda j: task.remote(j), wait_one, on_done)
    finally:
        if started:
            ray.shutdown()
