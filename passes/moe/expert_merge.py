"""expert_merge: reduce every MoE layer to fewer routed experts by merging groups of experts instead of dropping.

The `num_experts` (or `remove_fraction`, `coverage`) highest-ranked experts by `criterion` become group centres;
every other expert joins the centre it is most similar to: by `similarity: output` (cosine of the two experts'
outputs on the same calibration tokens) or `coactivation` (how often the router picks both for one token). Each
group's experts are aligned to the centre neuron by neuron (`align`; a permutation of an expert's intermediate
neurons computes the same function, and independently trained experts order them differently), then averaged
with weights proportional to their routed tokens (`weighting: frequency`) or equally. The group's router row is
the centre's (`router: dominant`, the group keeps the centre's routing) or the same weighted mean of the rows
(`router: mean`). Everything else is as in expert_trim: shared experts kept, config count updated (an ordinary
checkpoint with fewer experts), the same coverage diagnostics and predicted-risk warning (measured on copies of
the blocks, before the model changes), and the report lists every group. Experts must still be float: merge
before quantizing. Measured on the fixtures (eval/bench/moe_trim.py), merging lost more than dropping the same
number of experts by REAP or router mass, at 25% and 50% removed, on both architectures.

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 64, seq_len: 256}
    passes:
      - pass: expert_merge
        remove_fraction: 0.25
        criterion: reap
        similarity: output
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compressor.passes.moe._common import ExpertCountConfig, estimate_tensors
from compressor.registry import Artifact, PassResult, register_pass


class ExpertMergeConfig(ExpertCountConfig):
    """Merge each MoE layer's routed experts into fewer, frequency-weighted averages of similar experts."""

    criterion: Literal["reap", "frequency", "router_mass"] = Field("reap", description="ranks the experts that "
                                                                    "become group centres")
    similarity: Literal["output", "coactivation"] = Field("output", description="how experts are grouped")
    weighting: Literal["frequency", "uniform"] = Field("frequency", description="weights of the average")
    router: Literal["dominant", "mean"] = Field("dominant", description="router row of a merged group")
    align: bool = Field(True, description="permute each expert's neurons to match the centre's before averaging")


def _merged(b, st, centres: list[int], cfg) -> tuple[dict, list]:
    """One layer's groups and, per group of two or more, (centre, merged weights, router row, bias)."""
    import torch

    from compressor.passes.moe import _expert_math as m
    from compressor.passes.moe._arch import expert_weights

    groups = m.assign_groups(centres, m.normalized_affinity(st["gram"] if cfg.similarity == "output" else st["coact"]))
    rows, bias = b.gate.weight.data, getattr(b.gate, "e_score_correction_bias", None)
    out = []
    for c, members in groups.items():
        if len(members) == 1:
            continue
        a = st["counts"][members].clone() if cfg.weighting == "frequency" else torch.ones(len(members))
        if float(a.sum()) == 0:  # a group calibration never reached: plain average
            a = torch.ones(len(members), dtype=torch.float64)
        ws = [expert_weights(b, e) for e in members]
        if cfg.align:
            ws = [ws[0]] + [m.align(ws[0], w) for w in ws[1:]]
        mb = None
        if isinstance(bias, torch.Tensor) and cfg.router == "mean":
            mb = float((a / a.sum() * bias[members].double()).sum())
        out.append((c, m.weighted_average(ws, a), m.merge_router_rows(rows[members], a, cfg.router), mb))
    return {str(c): g for c, g in groups.items()}, out


@register_pass("expert_merge", config=ExpertMergeConfig, consumes=Artifact.TORCH_MODEL,
               produces=Artifact.TORCH_MODEL, needs_calibration=True, output_bytes=estimate_tensors,
               memory_factor=1.3, not_after=("quantize_*",))
def run(handle, cfg: ExpertMergeConfig, ctx) -> PassResult:
    from compressor.passes.moe import _expert_math as m
    from compressor.passes.moe._arch import (ArchError, expert_weights, select, set_count, set_expert_weights,
                                             set_router_row)
    from compressor.passes.moe._common import check_count, diagnose, fail, resolve_model, simulate, stats_for

    arch, blocks, n, k = resolve_model("expert_merge", handle)
    count = check_count("expert_merge", cfg, arch, n, k)
    try:
        for b in blocks:
            expert_weights(b, 0)  # float, gated experts only: fail before any statistic is computed
    except ArchError as e:
        raise fail("expert_merge", str(e)) from None
    stats = stats_for("expert_merge", handle, arch, blocks, ctx)
    params_before = handle.num_parameters()
    scores = {b.name: m.scores(stats[b.name].t, cfg.criterion) for b in blocks}
    if count is None:
        count = max(max(m.count_for_coverage(stats[b.name]["prob_mass"], cfg.coverage, m.ranking(scores[b.name]))
                        for b in blocks), k)
    centres = {b.name: m.keep_top(scores[b.name], count) for b in blocks}
    groups, merges = {}, {}
    for b in ctx.progress(blocks, total=len(blocks), desc="merge experts", unit="layer"):
        groups[b.name], merges[b.name] = _merged(b, stats[b.name], centres[b.name], cfg)

    def apply(block) -> None:
        for c, w, row, bias in merges[block.name]:
            set_expert_weights(block, c, w)
            set_router_row(block, c, row, bias)
        select(block, centres[block.name])

    info = {"architecture": arch.model_type, "criterion": cfg.criterion, "similarity": cfg.similarity,
            "experts_before": n, "experts_after": count, "top_k": k, "layers": len(blocks), "groups": groups}
    # predicted risk on copies of the blocks; may refuse before anything changes
    info.update(diagnose("expert_merge", cfg, stats, centres, simulate(handle.model, blocks, stats, apply), ctx))
    for b in blocks:
        apply(b)
    set_count(handle.model, arch, count)
    params_after = handle.num_parameters()
    info.update(parameters_before=params_before, parameters_after=params_after)
    ctx.logger.info("expert_merge: %s, %d -> %d experts per layer (%s centres, %s similarity) in %d layers; "
                    "parameters %.2fM -> %.2fM; predicted risk %s (blocks change %.0f%%)", arch.model_type, n, count,
                    cfg.criterion, cfg.similarity, len(blocks), params_before / 1e6, params_after / 1e6,
                    info["predicted_risk"], 100 * info["mean_block_error"])
    return PassResult(info=info)
