"""expert_stats: measure how a mixture-of-experts model routes the calibration data, per layer and expert.

Per expert: routed tokens, router probability mass, and REAP saliency (the mean over the expert's tokens of its
gate weight times the norm of its output: how much the block's output depends on it); also router co-activation
and the experts' output similarity on a token sample, which expert_merge groups by. Nothing in the model
changes. The statistics are cached by content hash (model state + calibration tokens), so expert_trim or
expert_merge later in the recipe reuses them, and the report gets a per-layer heat map (`info.heatmap`: layers x
experts token share, router-mass share, REAP saliency) plus diagnostics: experts calibration never reached, and
per layer how many experts hold 90% of the router mass (few = skewed routing, safer to trim).

Supported: Mixtral, Qwen2-MoE (shared expert kept), Qwen3-MoE, OLMoE, DeepSeek-V3 (one expert group).

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 64, seq_len: 256}
    passes:
      - pass: expert_stats
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compressor.registry import Artifact, PassResult, register_pass


class ExpertStatsConfig(BaseModel):
    """Routing statistics of every sparse MoE block over the calibration data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mass_quantile: float = Field(0.9, gt=0, le=1, description="the report counts, per layer, the fewest "
                                 "experts holding this share of the router probability mass")


@register_pass("expert_stats", config=ExpertStatsConfig, consumes=Artifact.TORCH_MODEL,
               produces=Artifact.TORCH_MODEL, needs_calibration=True)
def run(handle, cfg: ExpertStatsConfig, ctx) -> PassResult:
    from compressor.passes.moe._common import resolve_model, stats_for, unreached
    from compressor.passes.moe._expert_math import count_for_coverage
    from compressor.passes.moe._stats import heatmap

    arch, blocks, n, k = resolve_model("expert_stats", handle)
    stats = stats_for("expert_stats", handle, arch, blocks, ctx)
    never = unreached(stats)
    needed = {name: count_for_coverage(st["prob_mass"], cfg.mass_quantile) for name, st in stats.items()}
    top_share = {name: round(float(st.share("counts").max()), 4) for name, st in stats.items()}
    info = {"architecture": arch.model_type, "layers": len(blocks), "experts_per_layer": n, "top_k": k,
            "calibration_tokens": next(iter(stats.values())).tokens, "unreached_experts": never,
            f"experts_for_{round(cfg.mass_quantile * 100)}pct_router_mass": needed,
            "max_token_share": top_share, "heatmap": heatmap(stats)}
    if never:
        ctx.logger.warning("expert_stats: calibration never routed a token to %d experts: %s",
                           sum(map(len, never.values())), "; ".join(f"{a}: {b}" for a, b in never.items()))
    ctx.logger.info("expert_stats: %s, %d layers x %d experts (top-%d); %d-%d experts hold %d%% of the router mass",
                    arch.model_type, len(blocks), n, k, min(needed.values()), max(needed.values()),
                    round(cfg.mass_quantile * 100))
    return PassResult(info=info)
