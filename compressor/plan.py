"""Planning: validate the recipe's passes against the registry and the target before any weight is loaded.

The plan checks pass names, each pass's config (with its own pydantic model), the order (nothing may change the
model after a pass has exported it), calibration where needed, and format legality on the target; then it
estimates peak memory and output size from the checkpoint's headers (no tensor data is read).
"""

from __future__ import annotations

import fnmatch

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from compressor import registry
from compressor.errors import RecipeError, TargetError
from compressor.recipe import ASSET_PREFIX, PassEntry, Recipe, format_validation_error, is_local_path, line_of
from compressor.targets import TargetSpec


@dataclass
class PlannedPass:
    section: str  # "passes" | "export"
    index: int
    entry: PassEntry
    info: registry.PassInfo
    config: BaseModel

    @property
    def name(self) -> str:
        return self.info.name

    def config_dict(self) -> dict:
        return self.config.model_dump(mode="json")


@dataclass
class Plan:
    recipe: Recipe
    target: TargetSpec
    passes: list[PlannedPass]
    verdicts: list[str] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)

    @property
    def transforms(self) -> list[PlannedPass]:
        return [p for p in self.passes if p.info.produces is registry.Artifact.TORCH_MODEL]

    @property
    def lowerings(self) -> list[PlannedPass]:
        """Passes that write artifacts: exports from the torch model, then passes over those artifacts
        (rule checks, engine builds), in recipe order."""
        return [p for p in self.passes if p.info.produces is not registry.Artifact.TORCH_MODEL]


def build_plan(recipe: Recipe, target: TargetSpec, lines: dict) -> Plan:
    file = recipe.path or "<recipe>"
    planned: list[PlannedPass] = []
    verdicts: list[str] = []
    lowered_by: PlannedPass | None = None
    produced = {registry.Artifact.TORCH_MODEL}
    entries = [("passes", i, e) for i, e in enumerate(recipe.passes)] + [("export", i, e) for i, e in enumerate(recipe.export)]
    for section, i, entry in entries:
        loc = (section, i)
        try:
            info = registry.get_pass(entry.name)
        except registry.UnknownPass as e:
            raise RecipeError(str(e), file=file, line=line_of(lines, loc + ("pass",)), key=f"{section}.{i}.pass") from None
        try:
            cfg = info.config.model_validate(entry.options)
        except ValidationError as e:
            raise format_validation_error(e, file, lines, prefix=loc, model=info.config) from None
        where = f"{section}.{i} ({info.name})"
        if info.consumes not in produced:
            raise RecipeError(f"pass {info.name} consumes {info.consumes.value}, which no earlier pass produces",
                              file=file, line=line_of(lines, loc), key=f"{section}.{i}")
        if info.produces is registry.Artifact.TORCH_MODEL and lowered_by is not None:
            raise RecipeError(f"pass {info.name} changes the model after {lowered_by.name} ({lowered_by.section}."
                              f"{lowered_by.index}) exported it, so the export would miss the change; move exports "
                              "after the passes that change the model (or into `export:`)",
                              file=file, line=line_of(lines, loc), key=f"{section}.{i}")
        early = [p for p in planned if any(fnmatch.fnmatch(p.name, pat) for pat in info.not_after)]
        if early:
            raise RecipeError(f"pass {info.name} cannot run after {early[0].name} ({early[0].section}."
                              f"{early[0].index}); put it before any {' / '.join(info.not_after)} pass",
                              file=file, line=line_of(lines, loc), key=f"{section}.{i}")
        if info.calibrates(cfg) and recipe.calibration is None:
            raise RecipeError(f"pass {info.name} needs calibration data: add a `calibration:` section",
                              file=file, line=line_of(lines, loc), key=f"{section}.{i}")
        for fmt in sorted(info.formats(cfg)):
            if not target.supports(fmt):
                raise TargetError(f"{file}:{line_of(lines, loc)}: {section}.{i} ({info.name}): {target.why_not(fmt)}")
            verdicts.append(f"{where}: {fmt.value} is native on {target.name}")
        if info.lowers:
            lowered_by = lowered_by or PlannedPass(section, i, entry, info, cfg)
        produced.add(info.produces)
        planned.append(PlannedPass(section, i, entry, info, cfg))
    plan = Plan(recipe, target, planned, verdicts)
    if recipe.model.streaming:  # larger than memory: what a streamed run can do (compressor.stream_plan)
        from compressor import stream_plan

        stream_plan.check(recipe, lines)
    plan.estimate = estimate(plan)
    return plan


# (name, shape, bytes) of each tensor of a checkpoint, read from safetensors headers.
TensorInfo = tuple[str, tuple[int, ...], int]


def _safetensors_tensors(folder: Path) -> list[TensorInfo] | None:
    """Every tensor's name, shape and bytes from the safetensors headers of a folder; no tensor data is read."""
    from compressor.checkpoint_io import read_safetensors_header

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    out: list[TensorInfo] = []
    for f in files:
        for k, v in read_safetensors_header(f).items():
            if k != "__metadata__":
                out.append((k, tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate(plan: Plan) -> dict[str, Any]:
    """Peak memory and output size, from headers only. Unknown for hub ids not yet downloaded and for .gguf
    files (whose tensors are dequantized on load)."""
    from compressor import assets

    src = plan.recipe.model.source
    folder = None
    if src.startswith(ASSET_PREFIX):
        folder = assets.asset_path(src[len(ASSET_PREFIX):])
    elif is_local_path(src) and Path(src).is_dir():
        folder = Path(src)
    tensors = _safetensors_tensors(folder) if folder is not None and folder.exists() else None
    if tensors is None:
        return {"known": False, "reason": "model size unknown before download or conversion (no safetensors headers)"}
    n_params = sum(_numel(t[1]) for t in tensors)
    model_bytes = sum(t[2] for t in tensors)
    factor = max([p.info.memory_factor for p in plan.passes] or [1.0])
    # The eval holds the baseline beside the result, plus activations for one window.
    peak = model_bytes * factor + (model_bytes if plan.recipe.eval else 0)
    streamed = {}
    if plan.recipe.model.streaming:  # one unit at a time: the peak does not grow with the model
        from compressor import stream_plan

        streamed = stream_plan.estimate(plan, tensors)
        peak = streamed["peak_memory_bytes"]
    out_bytes = 0
    for p in plan.passes:
        if p.info.output_bytes is None:
            continue
        after = p.info.output_bytes(p.config, tensors)
        if p.info.lowers:
            out_bytes += sum(t[2] for t in after)
        else:
            tensors = after
    return {"known": True, "parameters": n_params, "model_bytes": model_bytes,
            "peak_memory_bytes": int(peak), "output_bytes": int(out_bytes), **streamed}


def render(plan: Plan) -> str:
    r = plan.recipe
    lines = [f"recipe {r.name} ({r.path}) for target {plan.target.name}: {plan.target.description}",
             f"model: {r.model.source} ({r.model.dtype})"]
    if r.calibration:
        c = r.calibration
        lines.append(f"calibration: {c.source}, {c.num_samples} x {c.seq_len} tokens, seed {c.seed}")
    lines.append("passes:")
    for n, p in enumerate(plan.passes, 1):
        cfg = ", ".join(f"{k}={v}" for k, v in p.config_dict().items())
        lines.append(f"  {n}. {p.name} [{p.info.consumes.value} -> {p.info.produces.value}] {cfg}")
    if plan.verdicts:
        lines.append("legality:")
        lines += [f"  ok  {v}" for v in plan.verdicts]
    else:
        lines.append("legality: ok (no format that needs target support)")
    e = plan.estimate
    if e.get("known"):
        lines.append(f"estimate: {e['parameters'] / 1e6:.1f}M parameters, model {e['model_bytes'] / 1e6:.0f} MB, "
                     f"peak memory ~{e['peak_memory_bytes'] / 1e9:.2f} GB, outputs ~{e['output_bytes'] / 1e6:.0f} MB")
        if e.get("streaming"):
            s = e["streaming"]
            lines.append(f"streaming: {s['units']} units one at a time; peak = base {s['base'] / 1e9:.2f} + largest "
                         f"unit {s['largest_unit'] / 1e9:.2f} + read {s['read'] / 1e9:.2f} + quantize "
                         f"{s['quantize_work'] / 1e9:.2f} + activations {s['activations_in_memory'] / 1e9:.2f} GB")
    else:
        lines.append(f"estimate: {e.get('reason')}")
    if r.eval:
        lines.append("eval: " + ", ".join(f"{d.name} ({d.source})" for d in r.eval.datasets)
                     + f"; {r.eval.num_windows} x {r.eval.seq_len} tokens each")
    for g in r.gates:
        lines.append(f"gate: {g.metric} {g.kind} {g.limit}" + (f" on {g.eval_set}" if g.eval_set else "")
                     + (f" at {g.confidence:.0%} confidence" if getattr(g, "confidence", None) else ""))
    return "\n".join(lines)
