"""Plan and run a sweep: every variant planned first (no weights loaded), the runnable ones run through the
same `run_recipe` as `compress RECIPE` into OUT/variants/<name>/, one report in OUT/report/.

    from compressor.sweep.runner import run_sweep
    summary = run_sweep("recipes/smollm2-sweep.yaml", "h200", "out/sweep")

OUT/sweep.json holds the plan and each finished variant's outcome; rerunning into the same OUT skips variants
whose folder is complete (run_recipe writes it under a temporary name and renames it when done).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import CompressorError, InputError, RecipeError, TargetError

log = logging.getLogger("compressor.sweep")
SWEEP_FILE = "sweep.json"


@dataclass
class PlannedVariant:
    name: str
    set_args: list[str]
    overrides: dict
    status: str = "run"  # run | skipped
    reason: str | None = None
    group: str = ""
    passes: list[str] = field(default_factory=list)
    key: str | None = None  # what the variant computes (variant_key); a finished folder is reused only if it matches


@dataclass
class SweepPlan:
    recipe_path: str
    recipe_name: str
    target: str
    variants: list[PlannedVariant]

    @property
    def runnable(self) -> list[PlannedVariant]:
        return [v for v in self.variants if v.status == "run"]

    def render(self) -> str:
        lines = [f"sweep {self.recipe_name} ({self.recipe_path}) on {self.target}: {len(self.variants)} variants, "
                 f"{len(self.runnable)} to run"]
        for v in self.variants:
            what = " -> ".join(v.passes) if v.status == "run" else f"SKIPPED: {v.reason}"
            lines.append(f"  {v.name:32} {what}")
        return "\n".join(lines)


def _short(err: CompressorError, file: str) -> str:
    """The error's message without the recipe-file prefix (the sweep plan names the variant instead)."""
    s = str(err)
    return s.split(": ", 1)[1] if s.startswith(file) and ": " in s else s


def plan_sweep(recipe_path: str, target: str, overrides=(), model_override: str | None = None) -> SweepPlan:
    """Expand the recipe's `sweep:` section and plan every variant. A variant the planner refuses (illegal on
    the target, an invalid combination) is kept, marked skipped with the reason; an override key the recipe
    does not have is a RecipeError naming the sweep key."""
    from compressor.cache import key_of
    from compressor.pipeline import load_and_plan
    from compressor.recipe import dotted, line_of, load_recipe
    from compressor.sweep.spec import expand

    recipe, lines = load_recipe(recipe_path, overrides, model_override)
    file = str(recipe_path)
    if recipe.sweep is None:
        raise RecipeError("no `sweep:` section: a sweep recipe lists `grid:` and/or `variants:` under `sweep:`",
                          file=file, line=1, key="sweep")
    try:
        variants = expand(recipe.sweep)
    except ValueError as e:
        raise RecipeError(str(e), file=file, line=line_of(lines, ("sweep",)), key="sweep") from None
    planned = []
    for v in variants:
        pv = PlannedVariant(v.name, v.set_args(), v.overrides)
        try:
            plan = load_and_plan(recipe_path, target, [*overrides, *v.set_args()], model_override)
        except TargetError as e:
            pv.status, pv.reason = "skipped", f"illegal on {target}: {_short(e, file)}"
        except RecipeError as e:
            origin = _origin(v, e.key)
            structural = e.file == "--set" or ": unknown key " in str(e)  # a key the recipe does not have
            if structural and origin is not None:
                msg = str(e).split(": ", 2)[-1] if e.file == "--set" else _short(e, file).split(": ", 1)[-1]
                raise RecipeError(f"variant {v.name}: {msg}", file=file, line=line_of(lines, origin),
                                  key=dotted(origin)) from None
            pv.status, pv.reason = "skipped", f"refused by the plan: {_short(e, file)}"
        else:
            pv.passes = [p.name for p in plan.passes]
            r = plan.recipe
            first = plan.transforms[0].name if plan.transforms else None
            pv.group = key_of(r.model.source, r.model.dtype, r.calibration and r.calibration.model_dump(mode="json"),
                              first)
            pv.key = variant_key(r.model_dump(mode="json", exclude={"path"}), target)
        planned.append(pv)
    return SweepPlan(file, recipe.name, target, planned)


def variant_key(recipe_dump: dict, target: str) -> str:
    """Identity of a variant's run: its resolved recipe (as manifest.json records it) less its name, description,
    sweep section and line numbers, and the target."""
    from compressor.cache import key_of

    d = {k: v for k, v in recipe_dump.items() if k not in ("name", "description", "sweep", "path")}
    for sec in ("passes", "export"):
        d[sec] = [{k: v for k, v in p.items() if k != "line"} for p in d.get(sec) or []]
    return key_of("variant", target, d)


def _origin(v, err_key: str | None) -> tuple | None:
    """Where in the sweep section the override behind an error at recipe key `err_key` was set."""
    if err_key is None:
        return None
    best = None
    for k, loc in v.origin.items():
        if err_key == k or err_key.startswith(k + ".") or k.startswith(err_key + "."):
            if best is None or len(k) > len(best[0]):
                best = (k, loc)
    return best[1] if best else None


@dataclass
class SweepSummary:
    out: Path
    report: dict
    exit_code: int
    message: str


def run_sweep(recipe_path: str, target: str, out: str | Path | None = None, *, executor: str = "local",
              ray_address: str | None = None, parallel: int = 1, overrides=(), model_override: str | None = None,
              use_cache: bool = True, quiet: bool = False) -> SweepSummary:
    from compressor.sweep import executors, merge

    t_start = time.perf_counter()
    if executor not in ("local", "ray"):
        raise InputError(f"--executor {executor!r}: expected local or ray")
    if parallel < 1:
        raise InputError(f"--parallel {parallel}: expected 1 or more")
    if ray_address and executor != "ray":
        raise InputError("--ray-address needs --executor ray")
    if executor == "ray" and ray_address:
        executors.check_ray_address(ray_address)  # before planning: a dead cluster is refused in seconds
    plan = plan_sweep(recipe_path, target, overrides, model_override)
    out = Path(out or Path("out") / f"{plan.recipe_name}-sweep").absolute()
    previous = _open_out(out, plan)
    vdir = out / "variants"
    log.info("%s", plan.render())
    if not plan.runnable:
        raise InputError(f"{recipe_path}: no variant of the sweep can run on {target}: "
                         + "; ".join(f"{v.name}: {v.reason}" for v in plan.variants))
    results = _finished(vdir, plan, previous)
    if results:
        log.info("sweep: resuming: %d of %d variants already finished in %s (%s)", len(results), len(plan.runnable),
                 out, ", ".join(results))
    jobs = [{"name": v.name, "group": v.group, "recipe": str(Path(recipe_path).absolute()), "target": target,
             "variants_dir": str(vdir), "overrides": [*overrides, *v.set_args],
             "model_override": os.path.abspath(model_override) if model_override and os.path.exists(model_override)
             else model_override, "quiet": quiet or executor == "ray" or parallel > 1, "use_cache": use_cache,
             "env": executors.job_env(), "threads": _threads(executor)}
            for v in plan.runnable if v.name not in results]
    jobs.sort(key=lambda j: j["group"])  # a group's variants together: its leader first, the rest reuse its work
    total, t_run, finished = len(plan.runnable), time.perf_counter(), []

    def on_done(job: dict, res: dict) -> None:
        res = {k: v for k, v in res.items() if k != "name"} | {"resumed": False}
        results[job["name"]] = res
        finished.append(res["seconds"])
        _write_state(out, plan, results)
        done = len(results)
        left = total - done
        eta = (time.perf_counter() - t_run) / len(finished) * left / max(1, min(parallel, left or 1))
        what = {"ok": "done", "gates_failed": "done, gates FAILED"}.get(res["status"], f"FAILED: {res.get('error')}")
        saved = sum(res.get("saved", {}).values())
        log.info("sweep: %d/%d variants done (%s %s in %.0f s, %.0f s saved by reuse%s)%s", done, total,
                 job["name"], what.splitlines()[0], res["seconds"], saved,
                 f", {res['attempts']} attempts" if res.get("attempts", 1) > 1 else "",
                 f", ETA {_hms(eta)}" if left else "")

    _write_state(out, plan, results)
    if executor == "ray":
        executors.run_ray(jobs, parallel, on_done, ray_address)
    else:
        executors.run_local(jobs, parallel, on_done)
    report = merge.sweep_report(plan, vdir, results, executor=executor, parallel=parallel,
                                seconds=time.perf_counter() - t_start)
    merge.write_report(report, out / "report")
    s = report["sweep"]
    errors = [v for v in report["variants"] if v["status"] == "error"]
    if errors:
        code = 3 if any(results[v["name"]].get("exit_code") == 3 for v in errors) else 2
        msg = f"{len(errors)} variant(s) failed: " + "; ".join(f"{v['name']}: {v['reason'].splitlines()[0]}"
                                                             for v in errors)
    elif s["cheapest_passing"] is None:
        code, msg = 1, "no variant passes the gates"
    else:
        code, msg = 0, f"cheapest variant passing the gates: {s['cheapest_passing']}"
    return SweepSummary(out, report, code, msg + f" (report: {out / 'report' / 'report.md'})")


def _threads(executor: str) -> int | None:
    """Torch threads of a variant run elsewhere: the driver's own count, so a Ray worker (which Ray limits to
    its task's CPUs) computes with the same threads, and the same numbers, as a local run."""
    if executor != "ray":
        return None
    import torch

    return torch.get_num_threads()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _open_out(out: Path, plan: SweepPlan) -> dict:
    """OUT is new, or a sweep's folder (resume: -> the outcomes it recorded)."""
    f = out / SWEEP_FILE
    if f.is_file():
        try:
            return json.loads(f.read_text()).get("results", {})
        except ValueError:
            return {}
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder {out} exists and is not a sweep's; choose another --out")
    return {}


def _finished(vdir: Path, plan: SweepPlan, previous: dict) -> dict[str, dict]:
    """Variants whose folder is complete (run_recipe renames it into place when done) and was made by the same
    variant (its manifest's recipe and target give the same variant_key): they are not run again."""
    done, changed = {}, []
    for v in plan.runnable:
        folder = vdir / v.name
        if not (folder / "report" / "report.json").is_file():
            continue
        manifest = json.loads((folder / "manifest.json").read_text())
        if variant_key(manifest["recipe"], manifest["target"]) != v.key:
            changed.append(v.name)
            continue
        rec = previous.get(v.name) or {"status": "ok", "seconds": 0.0, "saved": {}, "attempts": 1}
        done[v.name] = rec | {"resumed": True}
    if changed:
        raise InputError(f"{vdir}: {', '.join(changed)} finished with a different recipe or target than the sweep "
                         "now asks for; delete those folders to run them again, or choose another --out")
    return done


def _write_state(out: Path, plan: SweepPlan, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {"schema_version": 1, "recipe": plan.recipe_path, "target": plan.target,
             "variants": [{"name": v.name, "status": v.status, "reason": v.reason, "overrides": v.overrides,
                           "passes": v.passes, "key": v.key} for v in plan.variants],
             "results": results}
    tmp = out / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
    os.replace(tmp, out / SWEEP_FILE)
