"""Pass registry: explicit decorator registration, lazy discovery through the `compressor.passes` entry points.

A pass module is imported only when a recipe names it (or `compress passes` lists them all), so starting the
CLI never imports torch. Registering a name twice is an error.

    @register_pass("quantize_rtn", config=RTNConfig, consumes=Artifact.TORCH_MODEL,
                   produces=Artifact.TORCH_MODEL, formats=lambda c: {Format(c.format)})
    def run(model, config, ctx) -> PassResult: ...
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from typing import Any, Callable

from pydantic import BaseModel

from compressor.errors import CompressorError
from compressor.targets import Format

ENTRY_POINT_GROUP = "compressor.passes"


class Artifact(StrEnum):
    """What a pass consumes or produces."""

    TORCH_MODEL = "torch_model"
    """The in-memory torch model (ModelHandle)."""
    CHECKPOINT = "checkpoint"
    """A Hugging Face checkpoint folder on disk."""
    ONNX = "onnx"
    """An ONNX graph on disk."""
    ENGINE = "engine"
    """A TensorRT engine."""


@dataclass
class PassResult:
    """What a pass hands back: files it wrote (relative to the run's output folder) and facts for the report."""

    artifacts: list[dict] = field(default_factory=list)  # {"kind", "path", ...}
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    name: str
    config: type[BaseModel]
    run: Callable[..., PassResult]
    consumes: Artifact
    produces: Artifact
    # True, False, or a function of the config (e.g. only static activation scales need calibration).
    needs_calibration: bool | Callable[[Any], bool] = False
    formats: Callable[[Any], set[Format]] = lambda cfg: set()
    # Rough peak memory as a multiple of the model's bytes, for the plan's estimate.
    memory_factor: float = 1.0
    # For the plan's estimate: (config, [(tensor name, shape, bytes)]) -> the tensors after this pass (a transform)
    # or the tensors its artifact holds (a lowering).
    output_bytes: Callable[[Any, list], list] | None = None
    doc: str = ""
    # fnmatch patterns of passes this one cannot follow (e.g. structured pruning needs float weights, so not after
    # "quantize_*"); the plan refuses such an order before any weight is loaded.
    not_after: tuple[str, ...] = ()

    def calibrates(self, cfg) -> bool:
        nc = self.needs_calibration
        return bool(nc(cfg)) if callable(nc) else bool(nc)

    @property
    def lowers(self) -> bool:
        """A lowering pass writes an artifact from the model without changing the model."""
        return self.consumes is Artifact.TORCH_MODEL and self.produces is not Artifact.TORCH_MODEL


_REGISTRY: dict[str, PassInfo] = {}


class DuplicatePass(CompressorError):
    exit_code = 3


def register_pass(name: str, *, config: type[BaseModel], consumes: Artifact, produces: Artifact,
                  needs_calibration: bool | Callable[[Any], bool] = False, formats: Callable[[Any], set[Format]] | None = None,
                  memory_factor: float = 1.0, output_bytes: Callable[[Any, list], list] | None = None,
                  not_after: tuple[str, ...] = ()):
    def deco(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        if name in _REGISTRY:
            raise DuplicatePass(f"pass {name!r} is registered twice ({_REGISTRY[name].run.__module__} and {fn.__module__})")
        _REGISTRY[name] = PassInfo(name, config, fn, consumes, produces, needs_calibration,
                                   formats or (lambda cfg: set()), memory_factor, output_bytes,
                                   (fn.__module__ and importlib.import_module(fn.__module__).__doc__ or "").strip(),
                                   tuple(not_after))
        return fn

    return deco


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    return sorted(set(_entry_points()) | set(_REGISTRY))


class UnknownPass(CompressorError):
    exit_code = 2

    def __init__(self, name: str):
        close = difflib.get_close_matches(name, available(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown pass {name!r}{hint} (known: {', '.join(available())})")
        self.name, self.suggestion = name, (close[0] if close else None)


def get_pass(name: str) -> PassInfo:
    if name not in _REGISTRY:
        ep = _entry_points().get(name)
        if ep is None:
            raise UnknownPass(name)
        importlib.import_module(ep.value.split(":")[0])
        if name not in _REGISTRY:
            raise CompressorError(f"entry point {name!r} -> {ep.value} did not register a pass named {name!r}")
    return _REGISTRY[name]


def all_passes() -> list[PassInfo]:
    return [get_pass(n) for n in available()]
