"""Recipe: the YAML a model owner writes. Validated completely before any weight is loaded.

Errors name the recipe file, the line and the dotted key. YAML is read with the safe loader only, so a
recipe can never construct Python objects (`!!python/...` tags are an error).

Example (runs as shipped: `compress recipes/quickstart.yaml --target cpu`):

    schema_version: 1
    name: quickstart
    model: {source: "asset:smollm2-135m"}
    passes:
      - {pass: quantize_rtn, format: int8, granularity: per_channel}
    export:
      - {pass: export_checkpoint}
      - {pass: export_onnx}
    eval:
      datasets: [{name: python-docs, source: "asset:python-docs"}]
      intervals: {level: 0.95, resamples: 2000}   # bootstrap over windows; seed defaults to the recipe's
      usd_per_hour: 4.1                           # price of the target GPU for the modeled $/Mtok
    gates:
      - {metric: perplexity, max_increase_pct: 1.0}
      - {metric: perplexity, max_increase_pct: 2.0, confidence: 0.95}   # upper 95% bound of the increase
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from compressor.errors import RecipeError
from compressor.sweep.spec import SweepSpec

SCHEMA_VERSION = 1
ASSET_PREFIX = "asset:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Upper bounds on counts, token lengths and seeds: a typo like 10**30 is refused here, naming the key, instead of
# overflowing in torch or numpy after the model has loaded (seeds: what numpy and torch both accept).
MAX_COUNT = 1_000_000
MAX_TOKENS = 1 << 20
MAX_SEED = 2**32 - 1


def keyed_error(key: str, message: str) -> PydanticCustomError:
    """A validation error of a whole model that belongs to one of its keys (dotted, e.g. "gates.0.eval_set"):
    `format_validation_error` reports that key and its line instead of the model's."""
    return PydanticCustomError("keyed", message, {"key": key})


class Strict(BaseModel):
    """Base of every recipe model: unknown keys are errors, objects are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def is_local_path(source: str) -> bool:
    """A source is an asset name, a hub id (`org/name`, not present locally) or a local path."""
    if source.startswith(ASSET_PREFIX):
        return False
    if _HUB_ID.match(source) and not os.path.exists(source):
        return False
    return True


class ModelSpec(Strict):
    source: str = Field(description="asset:NAME, a local HF folder, a .gguf file, or a hub id (org/name)")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    streaming: bool = Field(False, description="compress a checkpoint larger than memory one decoder block at a "
                            "time (quantize_rtn / quantize_gptq + export_checkpoint, no eval; compressor.streaming)")


class DataSpec(Strict):
    source: str | list[str] = Field(description="asset:NAME, a local .txt/.json/.jsonl/.parquet file or folder, "
                                    "or a hub id; a list mixes several sources in equal shares")

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)
    text_field: str = "text"
    split: str = "train"
    num_samples: int = Field(32, gt=0, le=MAX_COUNT)
    seq_len: int = Field(512, gt=1, le=MAX_TOKENS)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class EvalSet(Strict):
    name: str = Field(min_length=1, max_length=200)
    source: str
    text_field: str = "text"
    split: str = "train"


class LatencySpec(Strict):
    enabled: bool = True
    prompt_len: int = Field(128, gt=0, le=MAX_TOKENS)
    decode_tokens: int = Field(16, gt=0, le=MAX_TOKENS)
    repetitions: int = Field(5, gt=0, le=10_000)
    warmup: int = Field(1, ge=0, le=10_000)
    threads: int | None = Field(None, gt=0, le=4096)


class IntervalSpec(Strict):
    """Bootstrap confidence intervals over eval windows (eval/stats.py), reported beside every quality metric."""

    level: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided coverage of the reported intervals")
    resamples: int = Field(2000, ge=100, le=100_000, description="bootstrap draws (same for every metric: paired)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the draws; default: the recipe's seed")


class TaskSpec(Strict):
    """A multiple-choice task built from held-out text and scored by our own log-likelihood scorer
    (eval/mc.py, eval/corpus_tasks.py): "which of `choices` lines is the true next line"."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="the task's name in the report and in gates")
    kind: Literal["next-line"] = Field("next-line", description="next-line: the true next line of held-out text "
                                       "among distractor lines from other held-out documents of the corpus")
    source: str | None = Field(None, description="corpus (asset:NAME, a local file or folder); default: the "
                               "first eval set's; only its held-out documents are used")
    num_items: int = Field(200, gt=0, le=100_000)
    choices: int = Field(4, ge=2, le=20)
    context_lines: int = Field(3, ge=1, le=50)
    seed: int | None = Field(None, ge=0, description="item selection seed; default: the recipe's seed")


class LmEvalSpec(Strict):
    """lm-evaluation-harness tasks from local files (extra `compressor[lmeval]`)."""

    tasks: list[str] = Field(min_length=1, description="task names; a name of eval.tasks is written as an "
                             "lm-eval task (YAML + jsonl) and run by lm-eval on the same items")
    include_path: str | list[str] | None = Field(None, description="folder(s) of task YAMLs with local data "
                                                 "files; relative to the recipe")
    limit: int | None = Field(None, gt=0, description="first N items of each task")
    builtin_tasks: bool = Field(False, description="also index lm-eval's built-in task YAMLs (their data may "
                                "need the hub)")


class EmbeddingSpec(Strict):
    """Embedding fidelity of encoder models: cosine of mean-pooled sentence embeddings to the original's."""

    num_sentences: int = Field(256, gt=1, le=100_000, description="held-out sentences per eval set")
    max_tokens: int = Field(128, gt=1, le=8192, description="tokens per sentence (longer ones are truncated)")
    batch_size: int = Field(32, gt=0, le=4096)


class ThroughputSpec(Strict):
    """Measured tokens/s at several batch sizes (torch CPU, and ONNX Runtime CPU where a graph is exported)."""

    enabled: bool = False
    batch_sizes: list[int] = Field(default=[1, 4, 16], min_length=1)
    prompt_len: int = Field(32, gt=0, le=65_536)
    decode_tokens: int = Field(8, gt=0, le=65_536)
    repetitions: int = Field(3, gt=0, le=1000)
    warmup: int = Field(1, ge=0, le=1000)
    threads: int | None = Field(None, gt=0, le=4096)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b <= 0 or b > 4096 for b in v):
            raise ValueError(f"batch sizes must be between 1 and 4096, got {v}")
        return v


class EvalSpec(Strict):
    datasets: list[EvalSet] = Field(min_length=1)
    num_windows: int = Field(16, gt=0, le=MAX_COUNT)
    seq_len: int = Field(512, gt=1, le=MAX_TOKENS)
    latency: LatencySpec = LatencySpec()
    batch_sizes: list[Annotated[int, Field(gt=0, le=MAX_TOKENS)]] = Field(
        default=[1, 8, 64], min_length=1, description="batch sizes for the modeled cost")
    intervals: IntervalSpec = IntervalSpec()
    usd_per_hour: float | None = Field(None, gt=0, allow_inf_nan=False, strict=True,
                                       description="price of one GPU-hour of the target for the modeled $/Mtok; "
                                       "default: the target's (compress targets; prices dated in targets.py)")
    tasks: list[TaskSpec] = Field(default=[], description="multiple-choice tasks built from held-out text, "
                                  "scored by our log-likelihood scorer (accuracy with bootstrap intervals)")
    lm_eval: LmEvalSpec | None = Field(None, description="lm-evaluation-harness tasks from local files")
    embeddings: EmbeddingSpec = Field(EmbeddingSpec(), description="encoder models: embedding fidelity settings")
    throughput: ThroughputSpec = Field(ThroughputSpec(), description="measured tokens/s at several batch sizes")

    @field_validator("datasets", "tasks")
    @classmethod
    def _unique_names(cls, v: list, info) -> list:
        names = [d.name for d in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            what = "eval set" if info.field_name == "datasets" else "task"
            raise ValueError(f"{what} names must be unique, repeated: {sorted(dup)}")
        return v


GATE_KINDS = ("max", "min", "max_increase", "max_increase_pct", "max_decrease", "max_decrease_pct")
# Quality metrics measured window by window: the only ones with a bootstrap interval and a per-set value.
WINDOW_METRICS = ("perplexity", "kl_divergence", "top1_agreement")
# Measured against the baseline's own outputs: the baseline has no value to compare a change with.
AGAINST_BASELINE = ("kl_divergence", "top1_agreement", "embedding_cosine", "embedding_cosine_min")
# Task accuracy: bootstrapped over the task's items (paired against the baseline), not over eval windows.
TASK_METRICS = ("accuracy", "accuracy_norm")
LATENCY_METRICS = ("latency_ms_prefill", "latency_ms_decode", "tokens_per_s")


class GateSpec(Strict):
    """A quality or cost gate. Exactly one limit kind. `max_increase*` compare result to baseline.
    With `confidence`, the gate holds only if the bootstrap bound of the metric (e.g. the upper 95% bound of the
    perplexity increase, one-sided) is within the limit."""

    metric: str
    eval_set: str | None = None
    max: float | None = None
    min: float | None = None
    max_increase: float | None = None
    max_increase_pct: float | None = None
    max_decrease: float | None = None
    max_decrease_pct: float | None = None
    confidence: float | None = Field(None, gt=0.5, lt=1.0, description="pass only if the metric is within the "
                                     "limit with this confidence (one-sided bootstrap bound over eval windows)")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        from compressor.eval.gates import KNOWN_METRICS

        if v not in KNOWN_METRICS:
            close = difflib.get_close_matches(v, KNOWN_METRICS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(KNOWN_METRICS)})"
            raise ValueError(f"unknown metric {v!r}{hint}")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> "GateSpec":
        given = [k for k in GATE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a gate needs exactly one of {', '.join(GATE_KINDS)}; got {given or 'none'}")
        what = f"gate {self.metric} {given[0]}"
        if self.metric in AGAINST_BASELINE and given[0] not in ("max", "min"):
            raise ValueError(f"{what}: {self.metric} is measured against the baseline, which has no value of its "
                             "own to change from; use max or min")
        if self.confidence is not None and self.metric not in WINDOW_METRICS + TASK_METRICS:
            raise ValueError(f"{what}: confidence needs a metric with a bootstrap interval "
                             f"({', '.join(WINDOW_METRICS + TASK_METRICS)}); {self.metric} has none")
        if self.eval_set is not None and self.metric not in WINDOW_METRICS:
            raise ValueError(f"{what}: eval_set applies to {', '.join(WINDOW_METRICS)}; {self.metric} is not "
                             "measured per eval set")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in GATE_KINDS if getattr(self, k) is not None)

    @property
    def limit(self) -> float:
        return getattr(self, self.kind)


class PassEntry(Strict):
    """One pass: `{pass: NAME, <config fields>}`. The fields are validated by that pass's own config model."""

    name: str
    options: dict[str, Any] = {}
    line: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, dict) and "pass" in data:
            rest = {k: v for k, v in data.items() if k != "pass"}
            return {"name": data["pass"], "options": rest}
        if isinstance(data, dict) and "name" in data:
            return data
        raise ValueError("a pass entry is a mapping with a `pass:` key naming the pass, e.g. {pass: quantize_rtn}")


class Recipe(Strict):
    schema_version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    description: str = ""
    model: ModelSpec
    calibration: DataSpec | None = None
    passes: list[PassEntry] = []
    export: list[PassEntry] = []
    eval: EvalSpec | None = None
    gates: list[GateSpec] = []
    seed: int = Field(0, ge=0, le=MAX_SEED)
    sweep: SweepSpec | None = Field(None, description="variants for `compress sweep` (grid and/or named list); "
                                    "an ordinary run ignores it")
    # Where the recipe was read from; set by `load_recipe`, used for error messages and relative paths.
    path: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _gates_need_eval(self) -> "Recipe":
        if self.gates and self.eval is None:
            raise keyed_error("gates", "gates need an `eval:` section to measure their metrics")
        if self.eval:
            names = {d.name for d in self.eval.datasets}
            for i, g in enumerate(self.gates):
                if g.eval_set is not None and g.eval_set not in names:
                    raise keyed_error(f"gates.{i}.eval_set", f"gate on {g.metric} names eval_set {g.eval_set!r}, "
                                      f"not one of {sorted(names)}")
        return self

    def all_passes(self) -> list[PassEntry]:
        return list(self.passes) + list(self.export)


# ---------------------------------------------------------------------------------------------------------
# Loading with line numbers


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each key path (('passes', 0, 'format')) to its 1-based line in the YAML text."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            out[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _line_map(v, path + (i,), out)
    return out


def line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def dotted(loc: tuple) -> str:
    """('passes', 0, 'format') -> 'passes.0.format'; a key that is empty or not a plain word is quoted."""
    return ".".join(str(p) if isinstance(p, int) or re.fullmatch(r"[\w-]+", str(p)) else repr(str(p)) for p in loc)


def _pydantic_loc(loc: tuple) -> tuple:
    """Drop pydantic's synthetic loc parts (union member names) and map PassEntry fields back to YAML keys."""
    out = []
    for p in loc:
        if isinstance(p, str) and (p.startswith("function-") or p in ("PassEntry",)):
            continue
        out.append(p)
    if len(out) >= 3 and out[0] in ("passes", "export") and out[2] == "name":
        out[2] = "pass"
    if len(out) >= 3 and out[0] in ("passes", "export") and out[2] == "options":
        del out[2]
    return tuple(out)


def format_validation_error(err: ValidationError, file: str, lines: dict[tuple, int], prefix: tuple = (),
                            model: type[BaseModel] | None = None) -> RecipeError:
    """One-line RecipeError for the first validation error. `prefix` locates a nested config (a pass's) whose
    pydantic `model` is then used for did-you-mean suggestions."""
    # An unknown key usually explains the "missing" error beside it (a typo), so it is reported first.
    first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = prefix + _pydantic_loc(tuple(first["loc"]))
    if first["type"] == "keyed":
        loc += tuple(int(k) if k.isdigit() else k for k in first["ctx"]["key"].split("."))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"unknown key {loc[-1]!r}"
        known = _known_keys(loc[len(prefix):-1], model) if model else _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return RecipeError(msg, file=file, line=line_of(lines, loc), key=dotted(loc) or None)


def _known_keys(parent: tuple, model: Any = None) -> list[str]:
    model = model or Recipe
    for p in parent:
        if isinstance(p, int):
            continue
        field = getattr(model, "model_fields", {}).get(p)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cand = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not cand:
            return []
        model = cand[0]
    return list(getattr(model, "model_fields", {}))


def parse_set(expr: str) -> tuple[list[str], Any]:
    """`--set eval.num_windows=8` -> (['eval', 'num_windows'], 8). The value is parsed as YAML (safely)."""
    if "=" not in expr:
        raise RecipeError(f"--set needs KEY=VALUE, got {expr!r}", file="--set")
    key, raw = expr.split("=", 1)
    if not key.strip():
        raise RecipeError(f"--set needs KEY=VALUE, got {expr!r}", file="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"value is not valid YAML: {e}", file="--set", key=key) from None
    if isinstance(value, str) and os.path.exists(value) and not os.path.isabs(value):
        value = os.path.abspath(value)  # paths on the command line are relative to the current directory
    return key.strip().split("."), value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    node: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise RecipeError(f"index {k!r} is out of range (list has {len(node)} items)", file="--set", key=where)
            k = int(k)
            if last:
                node[k] = value
            else:
                node = node[k]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {})
        else:
            raise RecipeError("cannot set a key inside a scalar", file="--set", key=where)


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), model_override: str | None = None) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe. Returns the Recipe and the line map used for later errors."""
    p = Path(path)
    file = str(p)
    if not os.path.isfile(p):
        raise RecipeError("recipe file not found", file=file)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}", file=file,
                          line=raw[: e.start].count(b"\n") + 1) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        if line is None and isinstance(getattr(e, "position", None), int):  # a ReaderError: bad character
            line = text[: e.position].count("\n") + 1
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
        problem = " ".join(str(problem).split())
        raise RecipeError(f"not valid YAML: {problem}", file=file, line=line or 1) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping (key: value) at the top level", file=file, line=1)
    lines = _line_map(node) if node is not None else {}
    data = copy.deepcopy(data)
    for expr in overrides:
        keys, value = parse_set(expr)
        apply_override(data, keys, value)
    if model_override:
        data.setdefault("model", {})
        if not isinstance(data["model"], dict):
            raise RecipeError("model must be a mapping", file=file, line=line_of(lines, ("model",)), key="model")
        data["model"]["source"] = os.path.abspath(model_override) if os.path.exists(model_override) else model_override
    base = p.resolve().parent
    _resolve_paths(data, base)
    try:
        recipe = Recipe.model_validate({**data, "path": file})
    except ValidationError as e:
        raise format_validation_error(e, file, lines) from None
    passes = [pe.model_copy(update={"line": line_of(lines, (sec, i))})
              for sec in ("passes", "export") for i, pe in enumerate(getattr(recipe, sec))]
    n = len(recipe.passes)
    recipe = recipe.model_copy(update={"passes": passes[:n], "export": passes[n:]})
    _check_files(recipe, file, lines)
    _check_gates(recipe, file, lines)
    return recipe, lines


def _check_gates(recipe: Recipe, file: str, lines: dict) -> None:
    """Refuse, before any weight is loaded, a gate on a metric this recipe's run will not compute."""
    ev = recipe.eval
    for i, g in enumerate(recipe.gates):
        loc = ("gates", i)
        what = f"gate {g.metric} {g.kind} {g.limit}"
        if g.metric in LATENCY_METRICS:
            if not ev.latency.enabled:
                raise RecipeError(f"{what}: latency is not measured (eval.latency.enabled is false)",
                                  file=file, line=line_of(lines, loc), key=dotted(loc))
            if not any(p.name == "export_onnx" for p in recipe.export):
                raise RecipeError(f"{what}: latency is measured on an exported ONNX graph and this recipe exports "
                                  "none; add {pass: export_onnx} to export:", file=file, line=line_of(lines, loc),
                                  key=dotted(loc))
        if g.metric in TASK_METRICS and not (ev.tasks or ev.lm_eval):
            raise RecipeError(f"{what}: task accuracy is measured only with eval.tasks or eval.lm_eval, and this "
                              "recipe has neither", file=file, line=line_of(lines, loc), key=dotted(loc))
        if g.confidence is not None and g.metric in WINDOW_METRICS and ev.num_windows < 2:
            raise RecipeError(f"{what} at confidence {g.confidence}: a bootstrap over eval windows needs "
                              f"eval.num_windows >= 2 (got {ev.num_windows})", file=file,
                              line=line_of(lines, loc), key=dotted(loc))


def _resolve_paths(data: dict, base: Path) -> None:
    """Relative local paths in a recipe are relative to the recipe's folder, so it runs from any directory."""

    def fix_one(s: str) -> str:
        if is_local_path(s) and not os.path.isabs(s) and not s.startswith("~"):
            cand = base / s
            if os.path.exists(cand) or not os.path.exists(s):  # (Path.exists raises on over-long names)
                return str(cand)
        elif s.startswith("~"):
            return os.path.expanduser(s)
        return s

    def fix(d: Any) -> None:
        if isinstance(d, dict) and isinstance(d.get("source"), str):
            d["source"] = fix_one(d["source"])
        elif isinstance(d, dict) and isinstance(d.get("source"), list):
            d["source"] = [fix_one(s) if isinstance(s, str) else s for s in d["source"]]

    fix(data.get("model"))
    fix(data.get("calibration"))
    for sec in ("passes", "export"):  # a pass's own data (distill's train_data) and teacher folder
        for p in data.get(sec) if isinstance(data.get(sec), list) else []:  # a wrong type is reported later
            if isinstance(p, dict):
                fix(p.get("train_data"))
                if isinstance(p.get("teacher"), str):
                    p["teacher"] = fix_one(p["teacher"])
    ev = data.get("eval")
    if isinstance(ev, dict) and isinstance(ev.get("datasets"), list):
        for d in ev["datasets"]:
            fix(d)


def _check_files(recipe: Recipe, file: str, lines: dict) -> None:
    from compressor import assets  # light module: names only

    checks = [(("model", "source"), recipe.model.source)]
    if recipe.calibration:
        srcs = recipe.calibration.sources
        checks += [(("calibration", "source") + ((i,) if len(srcs) > 1 else ()), s) for i, s in enumerate(srcs)]
    if recipe.eval:
        checks += [(("eval", "datasets", i, "source"), d.source) for i, d in enumerate(recipe.eval.datasets)]
    for loc, src in checks:
        if src.startswith(ASSET_PREFIX):
            name = src[len(ASSET_PREFIX):]
            if name not in assets.ASSETS:
                close = difflib.get_close_matches(name, list(assets.ASSETS), n=1)
                hint = f"; did you mean 'asset:{close[0]}'?" if close else f" (known: {', '.join(assets.ASSETS)})"
                raise RecipeError(f"unknown asset {name!r}{hint}", file=file, line=line_of(lines, loc), key=dotted(loc))
        elif is_local_path(src) and not os.path.exists(src):
            raise RecipeError(f"file or folder not found: {src}", file=file, line=line_of(lines, loc), key=dotted(loc))
