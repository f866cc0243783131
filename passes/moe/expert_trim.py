"""expert_trim: remove routed experts from every MoE layer, ranked by a criterion over calibration data.

Criteria: `reap` (REAP saliency: mean gate weight x expert output norm over the expert's tokens), `frequency`
(routed tokens), `router_mass` (summed router probability), `random` (seeded; a baseline). The target is a count
(`num_experts`), a share removed (`remove_fraction`), or a router-mass `coverage`. transformers configs hold one
expert count, so every layer keeps the same number (with `coverage`, the largest count any layer needs).

The router loses the removed experts' rows (and DeepSeek's correction bias entries), so routing over the kept
experts renormalises as the architecture does: softmax routers spread the removed experts' probability over the
kept ones, and top-k weights are renormalised where the architecture does so (Mixtral always; Qwen/OLMoE when
norm_topk_prob). Shared experts are kept. The config's expert count is updated, so the result is an ordinary
Hugging Face checkpoint that `from_pretrained` loads with fewer experts; quantization and export follow as for
any model. Removing an expert that is in no token's top-k leaves the outputs of top-k-renormalising routers
(Mixtral) exactly unchanged; other routers change by the probability the expert held.

Before anything changes, the pass predicts the damage: on copies of each block it measures how much the block's
output on sampled calibration tokens moves (relative L2, `mean_block_error`; on the fixtures it ranked the
perplexity increases of 36 trims and merges better than router-mass coverage), and warns (or fails, with
`on_risk: error`, nothing written) when that exceeds `max_block_error`. The report also gives per layer the kept
share of router mass, routed tokens and REAP output mass, lists layers keeping less than `min_coverage` of their
router mass and experts calibration never reached, and names every removed expert with its rank, score and
shares.

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 64, seq_len: 256}
    passes:
      - pass: expert_trim
        criterion: reap
        remove_fraction: 0.25     # or num_experts: 6, or coverage: 0.9
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compressor.passes.moe._common import ExpertCountConfig, estimate_tensors
from compressor.registry import Artifact, PassResult, register_pass


class ExpertTrimConfig(ExpertCountConfig):
    """Drop the least important routed experts of every MoE layer."""

    criterion: Literal["reap", "frequency", "router_mass", "random"] = Field(
        "reap", description="how experts are ranked (random: seeded, needs no calibration)")
    seed: int = Field(0, description="seed of the random criterion (layer i uses seed + i)")

    @model_validator(mode="after")
    def _coverage_needs_ranking(self):
        if self.criterion == "random" and self.coverage is not None:
            raise ValueError("coverage ranks experts by a criterion; criterion random has no ranking: "
                             "give num_experts or remove_fraction")
        return self


def _needs_calibration(cfg: ExpertTrimConfig) -> bool:
    return cfg.criterion != "random"


def _removed(cfg, n: int, keep: list[int], score, st, seed: int) -> list[dict]:
    """Why each removed expert of one layer went, with its shares of the calibration routing."""
    from compressor.passes.moe._expert_math import ranking

    rank = {e: r + 1 for r, e in enumerate(ranking(score))} if score is not None else {}
    rows = []
    for e in (e for e in range(n) if e not in keep):
        row = {"expert": e}
        if st is not None:
            row.update(token_share=round(float(st.share("counts")[e]), 4),
                       router_mass_share=round(float(st.share("prob_mass")[e]), 4), reap=round(float(st.reap[e]), 5))
        if cfg.criterion == "random":
            row["reason"] = f"random (seed {seed})"
        elif float(st["counts"][e]) == 0:
            row["reason"] = "calibration never routed a token to it"
        else:
            row["reason"] = f"{cfg.criterion} rank {rank[e]} of {n} (score {float(score[e]):.4g})"
        rows.append(row)
    return rows


@register_pass("expert_trim", config=ExpertTrimConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=_needs_calibration, output_bytes=estimate_tensors, memory_factor=1.2)
def run(handle, cfg: ExpertTrimConfig, ctx) -> PassResult:
    from compressor.passes.moe import _expert_math as m
    from compressor.passes.moe._arch import select, set_count
    from compressor.passes.moe._common import check_count, diagnose, fail, resolve_model, simulate, stats_for

    arch, blocks, n, k = resolve_model("expert_trim", handle)
    count = check_count("expert_trim", cfg, arch, n, k)
    if cfg.criterion != "random" and ctx.calibration is None:
        raise fail("expert_trim", f"criterion {cfg.criterion} needs calibration data (a `calibration:` section); "
                   "criterion random does not")
    stats = stats_for("expert_trim", handle, arch, blocks, ctx) if ctx.calibration is not None else None
    params_before = handle.num_parameters()
    scores = {b.name: (m.scores(stats[b.name].t, cfg.criterion) if cfg.criterion != "random" else None)
              for b in blocks}
    notes = []
    if count is None:  # coverage: the fewest top-ranked experts holding the router mass, largest over layers
        need = {b.name: m.count_for_coverage(stats[b.name]["prob_mass"], cfg.coverage, m.ranking(scores[b.name]))
                for b in blocks}
        count = max(max(need.values()), k)
        notes.append(f"expert_trim: coverage {cfg.coverage} needs {min(need.values())}-{max(need.values())} experts "
                     f"per layer; one expert count per config, so every layer keeps {count}")
    keeps = {b.name: (m.random_keep(n, count, cfg.seed + i) if cfg.criterion == "random"
                      else m.keep_top(scores[b.name], count)) for i, b in enumerate(blocks)}
    info = {"architecture": arch.model_type, "criterion": cfg.criterion, "experts_before": n, "experts_after": count,
            "top_k": k, "layers": len(blocks)}
    if stats is not None:  # predicted risk on copies of the blocks; may refuse before anything changes
        errors = simulate(handle.model, blocks, stats, lambda twin: select(twin, keeps[twin.name]))
        info.update(diagnose("expert_trim", cfg, stats, keeps, errors, ctx))
    removed = {b.name: _removed(cfg, n, keeps[b.name], scores[b.name], stats and stats[b.name], cfg.seed + i)
               for i, b in enumerate(blocks)}
    for b in blocks:
        select(b, keeps[b.name])
    set_count(handle.model, arch, count)
    params_after = handle.num_parameters()
    info.update(kept=keeps, removed=removed, parameters_before=params_before, parameters_after=params_after,
                notes=notes)
    for note in notes:
        ctx.logger.info(note)
    ctx.logger.info("expert_trim: %s, %d -> %d experts per layer by %s in %d layers; parameters %.2fM -> %.2fM%s",
                    arch.model_type, n, count, cfg.criterion, len(blocks), params_before / 1e6, params_after / 1e6,
                    f"; predicted risk {info['predicted_risk']} (blocks change {info['mean_block_error']:.0%})"
                    if stats is not None else "")
    return PassResult(info=info)
