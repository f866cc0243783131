"""The `sweep:` section of a recipe: which variants of the recipe to run.

    sweep:
      grid:                                # cartesian product of the listed values
        passes.0.format: [int8, int4]
        passes.0.group_size: [32, 64]
      variants:                            # named variants: `set:` overrides (like --set) and/or `passes:`
        - {name: rtn, set: {passes.0.pass: quantize_rtn}}
        - name: gptq
          passes: [{pass: quantize_gptq, format: int4, group_size: 64}]

With only `variants`, each one is a variant; with only `grid`, each combination is; with both, every named
variant is crossed with the grid (the grid's overrides applied on top of the variant's). Keys are dotted paths
into the recipe, exactly as `--set` takes them. Grid variants are named from their values
(`format-int4_group_size-32`), prefixed with the named variant's name when crossed.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME = r"^[A-Za-z0-9][\w.-]*$"
_KEY = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)*$")


def _check_key(k: str) -> str:
    if not _KEY.match(k):
        raise ValueError(f"override key {k!r} is not a dotted path into the recipe (e.g. passes.0.group_size)")
    if k.split(".")[0] in ("sweep", "name", "schema_version"):
        raise ValueError(f"override key {k!r}: a variant cannot change the recipe's {k.split('.')[0]}")
    return k


class VariantSpec(BaseModel):
    """One named variant: recipe overrides (`set:`, dotted keys as with --set) and/or replacement `passes:`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=NAME, description="variant name: its output folder OUT/variants/<name>")
    overrides: dict[str, Any] = Field({}, alias="set", description="dotted recipe key -> value, as --set takes them")
    passes: list[Any] | None = Field(None, description="replacement `passes:` list of the recipe")

    @field_validator("overrides")
    @classmethod
    def _keys(cls, v: dict) -> dict:
        for k in v:
            _check_key(k)
        return v


class SweepSpec(BaseModel):
    """Variants of the recipe to run and compare (compress sweep)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        None, description="dotted recipe key -> values; every combination runs")
    variants: list[VariantSpec] | None = Field(None, description="named variants (crossed with the grid if both)")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        if not v:
            raise ValueError("the grid is empty: give at least one key with a list of values")
        for k, vals in v.items():
            _check_key(k)
            dup = [json.dumps(x, sort_keys=True) for x in vals]
            if len(set(dup)) != len(dup):
                raise ValueError(f"grid key {k!r} lists a value twice")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list | None) -> list | None:
        if v is None:
            return v
        if not v:
            raise ValueError("the variant list is empty")
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique, repeated: {dup}")
        return v

    @model_validator(mode="after")
    def _something(self) -> "SweepSpec":
        if self.grid is None and self.variants is None:
            raise ValueError("a sweep needs `grid:` and/or `variants:`")
        return self


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]  # dotted key -> value, in application order
    origin: dict[str, tuple] = field(default_factory=dict)  # dotted key -> where the sweep section set it

    def set_args(self) -> list[str]:
        """The overrides as --set arguments (values as JSON, which YAML reads back unchanged)."""
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()] + [f"name={self.name}"]


def _slug(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))
    return re.sub(r"[^\w.-]+", "-", s).strip("-") or "x"


def _labels(keys: list[str]) -> dict[str, str]:
    """Shortest unambiguous label per grid key: its last segment, or more segments where two keys end alike."""
    out = {}
    for k in keys:
        parts = k.split(".")
        n = 1
        while n < len(parts) and sum(1 for o in keys if o.split(".")[-n:] == parts[-n:]) > 1:
            n += 1
        out[k] = "-".join(parts[-n:])
    return out


def expand(spec: SweepSpec) -> list[Variant]:
    """Every variant of the sweep, in a stable order. Raises ValueError (naming the variants) on a name clash."""
    named = spec.variants or [None]
    combos: list[list[tuple[str, Any]]] = [[]]
    if spec.grid:
        keys = list(spec.grid)
        combos = [list(zip(keys, vals)) for vals in itertools.product(*(spec.grid[k] for k in keys))]
        labels = _labels(keys)
    out: list[Variant] = []
    for vi, v in enumerate(named):
        for combo in combos:
            ov: dict[str, Any] = {}
            origin: dict[str, tuple] = {}
            if v is not None:
                if v.passes is not None:
                    ov["passes"], origin["passes"] = list(v.passes), ("sweep", "variants", vi, "passes")
                for k, val in v.overrides.items():
                    ov[k], origin[k] = val, ("sweep", "variants", vi, "set", k)
            for k, val in combo:
                ov[k], origin[k] = val, ("sweep", "grid", k)
            grid_name = "_".join(f"{labels[k]}-{_slug(val)}" for k, val in combo)
            name = "_".join(x for x in (v.name if v is not None else "", grid_name) if x)
            out.append(Variant(name, ov, origin))
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"variants would share a name (and an output folder): {dup}; name them explicitly")
    return out
