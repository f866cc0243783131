"""Plumbing shared by expert_trim and expert_merge: the target-count fields, architecture and count checks
(before any statistic is computed, so bad input costs nothing), statistics, and the coverage diagnostics."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import PassError


class ExpertCountConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int | None = Field(None, gt=0, description="routed experts kept per layer")
    remove_fraction: float | None = Field(None, gt=0, lt=1, description="share of each layer's routed experts "
                                          "removed (rounded to the nearest count)")
    coverage: float | None = Field(None, gt=0, le=1, description="keep, per layer, the fewest top-ranked experts "
                                   "holding this share of the router probability mass; transformers configs hold "
                                   "one expert count, so the largest such count is used in every layer")
    min_coverage: float = Field(0.8, ge=0, le=1, description="warn about layers whose kept experts hold less of "
                                "the router probability mass than this")
    max_block_error: float = Field(0.45, gt=0, description="predicted risk is high when the MoE blocks' outputs on "
                                   "calibration tokens change by more than this on average (relative L2)")
    on_risk: Literal["warn", "error"] = Field("warn", description="what a high predicted risk does: a warning, or "
                                              "an error before anything is changed or written")

    @model_validator(mode="after")
    def _one_target(self):
        given = [k for k in ("num_experts", "remove_fraction", "coverage") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of num_experts, remove_fraction, coverage; got {given or 'none'}")
        return self


def estimate_tensors(cfg: ExpertCountConfig, tensors: list) -> list:
    """For the plan's estimate, from checkpoint headers: routed-expert tensors and router rows shrink to the kept
    count. Fused experts are 3-D [E, ...] under `.experts.`; per-expert checkpoints (`experts.<e>.`) lose their
    highest indices (which experts go is decided at run time; the size is the same). A coverage target is only
    known after calibration: sizes stay."""
    import re

    from compressor.passes.moe._expert_math import remove_count

    routers = [t for t in tensors if re.search(r"\.gate\.weight$", t[0]) and len(t[1]) == 2]
    if not routers or cfg.coverage is not None:
        return tensors
    n = routers[0][1][0]
    keep = cfg.num_experts if cfg.num_experts is not None else n - remove_count(n, cfg.remove_fraction)
    if not 0 < keep <= n:
        return tensors
    out = []
    for name, shape, nbytes in tensors:
        per = re.search(r"\.experts\.(\d+)\.", name)
        if per and int(per.group(1)) >= keep:
            continue
        if (".experts." in name and not per and len(shape) >= 2 and shape[0] == n) or (
                re.search(r"\.gate\.(weight|e_score_correction_bias)$", name) and shape[0] == n):
            nbytes, shape = nbytes * keep // n, (keep, *shape[1:])
        out.append((name, tuple(shape), nbytes))
    return out


def fail(pass_name: str, msg: str, code: int = 2) -> PassError:
    return PassError(pass_name, [], msg, exit_code=code)


def resolve_model(pass_name: str, handle):
    """-> (arch, blocks, experts per layer, top_k), or a PassError naming the architecture."""
    from compressor.passes.moe._arch import ArchError, arch_of, moe_blocks, top_k

    try:
        arch = arch_of(handle.model)
        blocks = moe_blocks(handle.model, arch)
    except ArchError as e:
        raise fail(pass_name, str(e)) from None
    counts = {b.num_experts for b in blocks}
    if len(counts) != 1:
        raise fail(pass_name, f"{arch.model_type}: layers hold different expert counts {sorted(counts)}")
    return arch, blocks, counts.pop(), top_k(handle.model)


def check_count(pass_name: str, cfg: ExpertCountConfig, arch, n: int, k: int) -> int | None:
    """The fixed kept count (None for coverage, decided from statistics), checked against the model."""
    if cfg.num_experts is not None:
        keep = cfg.num_experts
        if keep > n:
            raise fail(pass_name, f"num_experts {keep} is more than the {n} experts per layer of this "
                       f"{arch.model_type} model")
        what = f"num_experts {keep}"
    elif cfg.remove_fraction is not None:
        from compressor.passes.moe._expert_math import remove_count

        keep = n - remove_count(n, cfg.remove_fraction)
        what = f"remove_fraction {cfg.remove_fraction} (keeps {keep} of {n})"
    else:
        return None
    if keep < k:
        raise fail(pass_name, f"{what} is below the {k} experts every token routes to (num_experts_per_tok of "
                   f"this {arch.model_type} model)")
    return keep


def stats_for(pass_name: str, handle, arch, blocks, ctx):
    if ctx.calibration is None:
        raise fail(pass_name, "needs calibration data for expert statistics (a `calibration:` section)")
    from compressor.passes.moe._stats import cached_collect

    stats, reused = cached_collect(handle, arch, blocks, ctx.calibration(), ctx)
    if reused:
        ctx.logger.info("%s: expert statistics reused from the cache", pass_name)
    return stats


def unreached(stats) -> dict[str, list[int]]:
    """{layer: experts calibration never routed a token to}."""
    return {n: [e for e, c in enumerate(st["counts"].tolist()) if c == 0] for n, st in stats.items()
            if (st["counts"] == 0).any()}


def simulate(model, blocks, stats, change) -> dict[str, float]:
    """Predicted damage, before the model is touched: each block is copied, `change(copy_block)` applied to the
    copy, and the relative change ||y' - y|| / ||y|| of the block's output (shared experts included) measured on
    the block's sampled calibration inputs. -> {block: relative error}."""
    import copy

    import torch

    from compressor.passes.moe._arch import MoEBlock

    memo = {id(model.config): model.config}  # copies keep pointing at the model's config
    out = {}
    with torch.no_grad():
        for b in blocks:
            x = stats[b.name]["inputs"].to(next(b.module.parameters()).dtype)[None]
            twin = MoEBlock(b.name, copy.deepcopy(b.module, dict(memo)))
            change(twin)
            y, y2 = (r[0] if isinstance(r, tuple) else r for r in (b.module(x), twin.module(x)))
            out[b.name] = round(float((y2 - y).float().norm() / y.float().norm().clamp_min(1e-12)), 4)
            del twin
    return out


def diagnose(pass_name: str, cfg: ExpertCountConfig, stats, keeps: dict[str, list[int]], errors: dict, ctx) -> dict:
    """Coverage diagnostics and the predicted-risk warning (or refusal), before the model changes.

    Per layer: the kept experts' shares of router mass, routed tokens and REAP output mass, and `errors`, the
    relative change of the block's output on calibration tokens (see simulate). Layers keeping less than
    min_coverage of their router mass are listed; the predicted risk is high when the mean block error exceeds
    max_block_error. Measured on the two fixtures (36 trims and merges): the mean block error ranked the
    perplexity increases best (Spearman 0.82; min router mass kept 0.67, min REAP mass kept 0.72)."""
    from compressor.passes.moe._expert_math import kept_share
    from compressor.passes.moe._stats import heatmap

    layers = {}
    for name, keep in keeps.items():
        st = stats[name]
        layers[name] = {"router_mass": round(kept_share(st["prob_mass"], keep), 4),
                        "tokens": round(kept_share(st["counts"], keep), 4),
                        "reap_mass": round(kept_share(st["reap_sum"], keep), 4), "block_error": errors[name]}
    never = unreached(stats)
    if never:
        ctx.logger.warning("%s: calibration never routed a token to %d experts (%s); their scores are 0, so they "
                           "go first", pass_name, sum(map(len, never.values())),
                           "; ".join(f"{n}: {v}" for n, v in never.items()))
    low = {n: c["router_mass"] for n, c in layers.items() if c["router_mass"] < cfg.min_coverage}
    if low:
        ctx.logger.warning("%s: in %d of %d layers the kept experts hold less than %.0f%% of the router mass: %s",
                           pass_name, len(low), len(layers), 100 * cfg.min_coverage,
                           ", ".join(f"{n} {v:.1%}" for n, v in low.items()))
    mean_err = sum(errors.values()) / len(errors)
    worst = max(errors, key=errors.get)
    risk = "high" if mean_err > cfg.max_block_error else "medium" if mean_err > cfg.max_block_error / 2 else "low"
    if risk == "high":
        msg = (f"predicted risk high: the MoE blocks' outputs on calibration tokens change by {mean_err:.0%} on "
               f"average (max_block_error {cfg.max_block_error:.0%}; worst {worst}: {errors[worst]:.0%}); expect a "
               "large quality loss")
        if cfg.on_risk == "error":
            raise fail(pass_name, msg + " (on_risk: error)", code=1)
        ctx.logger.warning("%s: %s", pass_name, msg)
    return {"coverage": layers, "predicted_risk": risk, "mean_block_error": round(mean_err, 4),
            "layers_below_min_coverage": low, "min_router_mass_kept": min(c["router_mass"] for c in layers.values()),
            "unreached_experts": never, "heatmap": heatmap(stats)}
