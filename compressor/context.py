"""RunContext: everything a pass may use besides the model and its config, passed explicitly, frozen."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compressor.targets import TargetSpec


@dataclass(frozen=True)
class RunContext:
    target: TargetSpec
    workdir: Path  # the run's temporary output folder; passes write artifacts under it
    cache_dir: Path
    seed: int = 0
    quiet: bool = False
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("compressor"))
    # Calibration batches: a callable returning token id tensors (N, L); None when the recipe has no calibration.
    calibration: Callable[[], Any] | None = None
    # False with --no-cache: passes then recompute calibration statistics instead of reusing cached ones.
    cache_enabled: bool = True

    def progress(self, iterable, total: int | None = None, desc: str = "", unit: str = "it"):
        """A progress bar with ETA on stderr (nothing with --quiet)."""
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=self.quiet, leave=False,
                    dynamic_ncols=True, mininterval=1.0)
