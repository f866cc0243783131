"""`compress`: the command line. Thin: parse, then call the same functions as the Python API.

    compress RECIPE --target T [--out DIR] [--model PATH] [--set key=value ...] [--overwrite] [--json] [--quiet]
    compress plan RECIPE --target T
    compress passes | targets | assets
    compress check-onnx FILE [--tensorrt-version V]
    compress report OUT                     # re-render report.md/.html/pareto.png from OUT/report/report.json
    compress compare OUT_A OUT_B [--json]   # quality with intervals, cost, gates that changed
    compress estimate --model DIR_OR_CONFIG --target T --scheme S [--batch B]...   # MODELED cost, no weights
    compress sweep RECIPE --target T [--executor local|ray] [--ray-address ADDR] [--parallel N] [--out DIR]

`compress sweep` runs every variant the recipe's `sweep:` section names (a grid of overrides and/or named
variants) through the same pipeline into OUT/variants/<name>/, and writes one report in OUT/report/: every
variant's quality and cost, the Pareto frontier, and the cheapest variant that passes the gates. Variants the
plan refuses on the target are listed with the reason and not run. Shared work (calibration statistics,
Hessians, exported baselines, finished stages) comes from the cache; the report says how much time that saved.
Rerunning into the same OUT skips finished variants. Exit 0 when a variant passes the gates, 1 when none does.

Exit codes: 0 ok; 1 a gate failed (outputs kept, the report says which); 2 bad recipe, target, input or missing
dependency (nothing written); 3 internal error (a bug: traceback printed).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

import click

from compressor.errors import CompressorError, GateFailed

COMMON = [
    click.option("--target", "-t", required=True, help="hardware target: h200, h100, a100, l40s, l4, b200, cpu"),
    click.option("--model", "model_override", default=None, help="model source overriding the recipe's model.source"),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="override any recipe field, e.g. --set eval.num_windows=4 (validated like the recipe)"),
]


def _common(f):
    for opt in reversed(COMMON):
        f = opt(f)
    return f


def _setup_logging(quiet: bool) -> None:
    # Ours at INFO (progress and results); everyone else's at WARNING (exporters and optimizers are chatty).
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("compressor").setLevel(logging.WARNING if quiet else logging.INFO)
    for name in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


class DefaultGroup(click.Group):
    """`compress RECIPE ...` means `compress run RECIPE ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressor")
def cli() -> None:
    """Compress a language model from a recipe, lower it, and report quality against cost."""


@cli.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@_common
@click.option("--out", "-o", default=None, help="output folder (default: out/<recipe name>)")
@click.option("--overwrite", is_flag=True, help="replace the output folder if it exists (only once the run succeeds)")
@click.option("--no-cache", is_flag=True, help="ignore and do not fill the cache")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary on stdout")
@click.option("--quiet", "-q", is_flag=True, help="warnings and errors only, no progress bars")
def run_cmd(recipe, target, model_override, overrides, out, overwrite, no_cache, as_json, quiet):
    """Run RECIPE for TARGET: passes, exports, evaluation, report."""
    _setup_logging(quiet)
    if quiet:  # transformers draws its own "Loading weights" bars on stderr
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from compressor.pipeline import run_recipe

    try:
        summary = run_recipe(recipe, target, out, overrides=overrides, model_override=model_override,
                             overwrite=overwrite, quiet=quiet, use_cache=not no_cache)
    except GateFailed as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(e), "exit_code": 1}))
        raise
    if as_json:
        click.echo(json.dumps(summary.to_json(), default=str))
    elif not quiet:
        m, b = summary.report["result"]["metrics"], summary.report["baseline"]["metrics"]
        line = f"done in {summary.seconds:.0f} s -> {summary.out}"
        if "perplexity" in m:
            line += (f"\n  perplexity {b['perplexity']:.3f} -> {m['perplexity']:.3f}, KL {m['kl_divergence']:.4f}, "
                     f"top-1 {m['top1_agreement']:.4f}, bytes {b['model_bytes'] / 1e6:.0f} MB -> {m['model_bytes'] / 1e6:.0f} MB")
        click.echo(line + f"\n  report: {summary.out / 'report' / 'report.md'}")


@cli.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@_common
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(recipe, target, model_override, overrides, as_json):
    """Validate RECIPE for TARGET and print the ordered passes, legality and estimates. Loads no weights."""
    from compressor.plan import render
    from compressor.pipeline import load_and_plan

    plan = load_and_plan(recipe, target, overrides, model_override)
    if as_json:
        click.echo(json.dumps({"target": plan.target.name, "passes": [
            {"name": p.name, "section": p.section, "config": p.config_dict()} for p in plan.passes],
            "verdicts": plan.verdicts, "estimate": plan.estimate}))
    else:
        click.echo(render(plan))


@cli.command("passes")
def passes_cmd():
    """List the registered passes and their config fields."""
    from compressor.registry import all_passes

    for info in all_passes():
        click.echo(f"{info.name}  [{info.consumes.value} -> {info.produces.value}]"
                   + ("  (needs calibration)" if info.needs_calibration is True else
                      "  (may need calibration)" if callable(info.needs_calibration) else ""))
        for name, f in info.config.model_fields.items():
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            ann = f.annotation.__name__ if isinstance(f.annotation, type) else str(f.annotation).replace("typing.", "")
            desc = f" - {f.description}" if f.description else ""
            click.echo(f"    {name}: {ann} ({default}){desc}")


@cli.command("targets")
def targets_cmd():
    """List the hardware target profiles."""
    from compressor.targets import TARGETS

    click.echo(f"{'target':7} {'memory':>8} {'bandwidth':>10} {'bf16 TF/s':>9} {'fp8 TF/s':>9} {'cc':>5}  formats")
    for t in TARGETS.values():
        cc = f"{t.compute_capability[0]}.{t.compute_capability[1]}" if t.compute_capability else "-"
        mem = f"{t.memory_bytes / 1e9:.0f} GB" if t.memory_bytes else "-"
        bw = f"{t.bandwidth_bytes_per_s / 1e12:.2f} TB/s" if t.bandwidth_bytes_per_s else "-"
        bf = f"{t.peak_flops.get('bf16', 0) / 1e12:.0f}" if t.peak_flops.get("bf16") else "-"
        f8 = f"{t.peak_flops.get('fp8', 0) / 1e12:.0f}" if t.peak_flops.get("fp8") else "-"
        click.echo(f"{t.name:7} {mem:>8} {bw:>10} {bf:>9} {f8:>9} {cc:>5}  {', '.join(sorted(f.value for f in t.formats))}")


@cli.command("check-onnx")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tensorrt-version", default=None, help="TensorRT release whose rules apply (default: the newest known)")
def check_onnx_cmd(file, tensorrt_version):
    """Lint an ONNX file against TensorRT's quantization rules and op allow-list; exit 1 listing offenders."""
    from compressor import tensorrt_rules as rules
    from compressor.errors import InputError, RulesViolated

    version = tensorrt_version or rules.DEFAULT_VERSION
    try:
        findings = rules.check(file, version)
    except rules.CheckError as e:
        raise InputError(str(e)) from None
    for f in findings:
        click.echo(str(f))
    if findings:
        raise RulesViolated(f"{file}: {len(findings)} finding(s) against TensorRT {version} rules")
    click.echo(f"{file}: fits TensorRT {version} rules")


@cli.command("report")
@click.argument("out", type=click.Path())
def report_cmd(out):
    """Re-render report.md, report.html and pareto.png from OUT/report/report.json."""
    from compressor.eval.report import rerender

    folder = rerender(out)
    click.echo(f"rendered {folder / 'report.md'}, {folder / 'report.html'}, {folder / 'pareto.png'}")


@cli.command("compare")
@click.argument("out_a", type=click.Path())
@click.argument("out_b", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the comparison as JSON")
def compare_cmd(out_a, out_b, as_json):
    """Compare two runs' reports: metrics with intervals (B - A paired when the eval windows match), cost,
    and the gates whose verdict changed."""
    from compressor.eval import compare
    from compressor.eval.report import load

    (a, _), (b, _) = load(out_a), load(out_b)
    c = compare.compare(a, b, out_a, out_b)
    click.echo(json.dumps(c, default=str) if as_json else compare.render(c))


@cli.command("estimate")
@click.option("--model", "model", required=True, help="model folder or config.json (or asset:NAME); weights not read")
@click.option("--target", "-t", required=True, help="GPU target: h200, h100, a100, l40s, l4, b200")
@click.option("--scheme", "-s", required=True, help="bf16, fp8, int8 (W8A8), w8a16, w4a16 (int4), w4a8, nvfp4")
@click.option("--batch", "-b", "batches", type=click.IntRange(min=1), multiple=True,
              help="batch size (repeatable; default 1, 8, 64, 256)")
@click.option("--input-len", type=click.IntRange(min=1), default=1024, show_default=True, help="prompt tokens")
@click.option("--output-len", type=click.IntRange(min=1), default=1024, show_default=True, help="generated tokens")
@click.option("--kv-cache", type=click.Choice(["bf16", "fp8"]), default="bf16", show_default=True)
@click.option("--usd-per-hour", type=float, default=None, help="GPU-hour price (default: the target's)")
@click.option("--json", "as_json", is_flag=True)
def estimate_cmd(model, target, scheme, batches, input_len, output_len, kv_cache, usd_per_hour, as_json):
    """MODELED decode/prefill time, crossover batch, memory and $/Mtok of a model config in a scheme on a target.
    Builds the model on the meta device: no weights are read, a bare config.json is enough."""
    import math

    from compressor.errors import InputError
    from compressor.eval import cost_model
    from compressor.targets import get_target

    if usd_per_hour is not None and not (math.isfinite(usd_per_hour) and usd_per_hour > 0):
        raise InputError(f"--usd-per-hour must be a positive number, got {usd_per_hour}")
    t = get_target(target)
    cfg = cost_model.load_config(model)
    est = cost_model.estimate(cfg, t, scheme.lower(), list(batches) or [1, 8, 64, 256], input_len, output_len,
                              kv_cache, usd_per_hour)
    click.echo(json.dumps(est) if as_json else cost_model.render_estimate(est))


@cli.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False))
@_common
@click.option("--out", "-o", default=None, help="sweep folder (default: out/<recipe name>-sweep); rerun to resume")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine; ray: a Ray cluster (--ray-address, else a local one)")
@click.option("--ray-address", default=None, help="HOST:PORT (or ray://HOST:PORT, auto) of a running Ray cluster")
@click.option("--parallel", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="variants at a time (each loads the model and uses the CPU cores it gets)")
@click.option("--no-cache", is_flag=True, help="ignore and do not fill the cache (nothing is reused)")
@click.option("--plan-only", is_flag=True, help="print the sweep plan (variants, skipped ones and why) and stop")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary on stdout")
@click.option("--quiet", "-q", is_flag=True, help="warnings and errors only")
def sweep_cmd(recipe, target, model_override, overrides, out, executor, ray_address, parallel, no_cache, plan_only,
              as_json, quiet):
    """Run the variants of RECIPE's `sweep:` section for TARGET; one report with the Pareto frontier and the
    cheapest variant that passes the gates."""
    _setup_logging(quiet)
    from compressor.sweep import runner

    if plan_only:
        click.echo(runner.plan_sweep(recipe, target, overrides, model_override).render())
        return
    s = runner.run_sweep(recipe, target, out, executor=executor, ray_address=ray_address, parallel=parallel,
                         overrides=overrides, model_override=model_override, use_cache=not no_cache, quiet=quiet)
    sw = s.report["sweep"]
    if as_json:
        click.echo(json.dumps({"out": str(s.out), "exit_code": s.exit_code, "message": s.message, **sw,
                               "variants": [{k: v.get(k) for k in ("name", "status", "reason", "passed", "cost",
                                                                    "frontier", "cheapest_passing", "seconds",
                                                                    "seconds_saved", "attempts", "resumed")}
                                            | {"perplexity": (v.get("metrics") or {}).get("perplexity")}
                                            for v in s.report["variants"]]}, default=str))
    elif not quiet:
        from compressor.eval.report import md_table, sweep_notes, sweep_table

        click.echo("\n".join(md_table(sweep_table(s.report)) + sweep_notes(s.report)))
    if s.exit_code == 1:
        raise GateFailed(s.message)
    if s.exit_code:
        err = CompressorError(s.message)
        err.exit_code = s.exit_code
        raise err
    if not quiet and not as_json:
        click.echo(s.message)


@cli.command("assets")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--fixtures", is_flag=True, help="also train the MoE fixtures now (otherwise built on first use)")
def assets_cmd(quiet, fixtures):
    """Prepare the bundled model and text corpora in $COMPRESSOR_HOME (idempotent). The MoE fixtures are trained
    on first use (a few CPU-minutes each), or here with --fixtures."""
    _setup_logging(quiet)
    from compressor import assets

    for name, a in assets.ASSETS.items():
        if a.kind == "fixture" and not fixtures:
            continue
        p = assets.prepare(name)
        if not quiet:
            click.echo(f"{name:14} {p}")


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: remember it (the output is then never published, even if a library swallowed the exception),
    and interrupt whatever runs now."""
    from compressor.artifacts import INTERRUPTED

    INTERRUPTED.set()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    from compressor.artifacts import INTERRUPTED

    INTERRUPTED.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli.main(args=argv, prog_name="compress", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: the partial output folder was removed; finished stages stay cached", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except GateFailed as e:
        click.echo(f"gate failed: {e}", err=True)
        return 1
    except Exception as e:  # noqa: BLE001 - the disk or memory ran out: not a bug, say which
        fault = resource_fault(e)
        if fault is None:
            return _error(e)
        click.echo(f"error: {fault}", err=True)
        return 2
    return 0


def resource_fault(e: BaseException) -> str | None:
    """A one-line description if `e` (or an exception it was raised from) is the disk filling up or memory
    running out, else None. Typed errors (OSError's errno, MemoryError) anywhere in the chain come first; then
    the messages of errors that quote them (torch's allocator, a wrapped OSError)."""
    import errno

    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            where = f" writing {x.filename}" if x.filename else ""
            return f"out of disk space{where} ({x.strerror or x})"
        if isinstance(x, MemoryError) or (isinstance(x, OSError) and x.errno == errno.ENOMEM):
            detail = " ".join(str(x).split())[:300] if isinstance(x, MemoryError) else x.strerror
            return f"out of memory ({detail or 'MemoryError'})"
    for x in chain:
        text = str(x)
        for needle in ("can't allocate memory", "Cannot allocate memory", "No space left on device",
                       "File too large", "Disk quota exceeded"):
            if needle in text:
                kind = "memory" if "alloc" in needle else "disk space"
                return f"out of {kind}: {' '.join(text.split())[:300]}"
    return None


def _error(e: Exception) -> int:
    if isinstance(e, CompressorError):
        click.echo(f"error: {' '.join(str(e).split()) if e.exit_code == 2 else e}", err=True)
        if e.exit_code == 3:
            traceback.print_exception(e)
        return e.exit_code
    traceback.print_exception(e)  # a bug: show it whole
    click.echo("internal error (exit 3): please report it with the traceback above", err=True)
    return 3


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
