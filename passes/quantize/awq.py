"""quantize_awq: activation-aware weight quantization (AWQ, Lin et al., 2024) for INT4/INT8 weights.

Layer-sequential: for each decoder block, the inputs of its Linear layers are observed (Hessian X^T X and
mean |X| per channel; q/k/v and gate/up share one), then for each mapping (norm -> q/k/v, v -> o,
norm -> gate/up, up -> down; see _mappings):
  1. scale search: s = mean|X|^a / mean|W|^(1-a) for a on a grid (and s = 1), scored by the layers' output
     error with the quantized weights, tr(dW H dW^T); the best s is folded into the model;
  2. clipping search: per (row, group), the range shrink ratio with the smallest output error;
then the block's layers are quantized and the block's outputs, computed with quantized weights, feed the
next block. Weight-only (W4A16) by default; `activations:` gives W4A8.

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 128, seq_len: 512}
    passes:
      - pass: quantize_awq
        format: int4
        group_size: 64
        symmetric: true
"""

from __future__ import annotations

from pydantic import Field

from compressor.errors import PassError
from compressor.passes.quantize._activations import calibrate_static
from compressor.passes.quantize._config import IntWeightConfig, formats, output_bytes
from compressor.registry import Artifact, PassResult, register_pass


class AWQConfig(IntWeightConfig):
    """AWQ weight quantization."""

    grid: int = Field(20, ge=1, le=100, description="alpha values tried in [0, 1)")
    duo_scaling: bool = Field(True, description="divide by mean |W| too (as AutoAWQ); false: s = mean|X|^a")
    clip_search: bool = True
    clip_grid: int = Field(20, ge=2, le=100)
    max_shrink: float = Field(0.5, gt=0.0, lt=1.0, description="clipping search tries ranges down to 1 - this")


def _shared_stats(name, stats, all_names, no_tokens):
    """An expert's stats, or (if it saw no token) the average of its siblings' (listed in no_tokens)."""
    import torch

    from compressor.moe import siblings

    st = stats.get(name)
    if st is not None and st.n:
        return st.hessian.to(torch.float32), st.x_mean
    sib = [stats[s] for s in siblings(name, all_names) if s in stats and stats[s].n]
    if not sib:
        raise PassError("quantize_awq", [], f"{name} received no calibration tokens and no sibling expert did "
                        "either; give more calibration data")
    no_tokens[name] = f"average of {len(sib)} sibling experts"
    return torch.stack([s.hessian for s in sib]).mean(0).to(torch.float32), torch.stack([s.x_mean for s in sib]).mean(0)


@register_pass("quantize_awq", config=AWQConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=True, formats=formats, memory_factor=1.5, output_bytes=output_bytes)
def run(handle, cfg: AWQConfig, ctx) -> PassResult:
    import fnmatch

    import torch

    from compressor.calibration.forward_loop import decoder_blocks
    from compressor.passes.quantize import _rtn_math as m
    from compressor.passes.quantize._awq_math import search_clip, search_scales
    from compressor.passes.quantize._hessians import collect
    from compressor.passes.quantize._layers import install_quantized, prepare, run_blocks, select_layers, split_ragged
    from compressor.passes.quantize._mappings import block_mappings
    from compressor.passes.quantize._smooth_math import fold, weight_group_mean

    if ctx.calibration is None:
        raise PassError("quantize_awq", [], "needs calibration data (a `calibration:` section)", exit_code=2)
    prepare(handle.model, ctx.logger)
    model = handle.model
    batches = ctx.calibration()
    blocks = decoder_blocks(model)
    prefix = next(n for n, mod in model.named_modules() if mod is blocks)
    all_layers = [select_layers(b, cfg.ignore, prefix=f"{prefix}.{i}") for i, b in enumerate(blocks)]
    flat, skipped = split_ragged("quantize_awq", [x for ls in all_layers for x in ls], cfg.group_size or None,
                                 cfg.ragged)
    keep = {n for n, _ in flat}
    bits = cfg.bits
    act = cfg.activations.scheme if cfg.activations else None
    report: dict[str, dict] = {}
    no_tokens: dict[str, str] = {}

    def work(i: int, block, run_block) -> None:
        layers = [(n, lin) for n, lin in all_layers[i] if n in keep]
        try:
            maps = block_mappings(block, f"{prefix}.{i}")
        except TypeError as e:
            raise PassError("quantize_awq", [], str(e), exit_code=2) from None
        probes = [(p, mod) for mp in maps for p, mod in mp.passengers]
        with collect(layers + probes) as stats:
            run_block()
        names = [n for n, _ in layers]
        col_scale: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for mp in maps:
                lins = [(n, lin) for n, lin in mp.linears if n in keep]
                if len(lins) != len(mp.linears) or any(fnmatch.fnmatchcase(mp.prev_name, p) for p in cfg.ignore):
                    continue  # part of the mapping is kept in float: scaling would change it
                hx = [_shared_stats(n, stats, names, no_tokens) for n, _ in lins]
                probe = mp.passengers[0][0] if mp.passengers else None
                x_mean = stats[probe].x_mean if probe and stats.get(probe) and stats[probe].n else hx[0][1]
                ws = [lin.weight.detach() for _, lin in lins]
                w_mean = weight_group_mean([lin for _, lin in lins], cfg.group_size) if cfg.duo_scaling \
                    else torch.ones_like(x_mean)
                choice = search_scales(ws, [h for h, _ in hx], x_mean, w_mean, bits, cfg.group_size,
                                       cfg.symmetric, cfg.grid)
                if choice.alpha is not None:
                    fold(mp.prev, [lin for _, lin in lins], choice.scales, [p for _, p in mp.passengers])
                    for n, _ in lins:
                        col_scale[n] = choice.scales
                for n, _ in lins:
                    report[n] = {"alpha": choice.alpha, "err_ratio": round(choice.error / max(choice.error_rtn, 1e-30), 4)}
            for n, lin in layers:
                h, _ = _shared_stats(n, stats, names, no_tokens)
                if n in col_scale:
                    s = col_scale[n].to(h.dtype)
                    h = h / s[:, None] / s[None, :]  # the layer now reads X / s
                w = lin.weight.detach()
                ratio = search_clip(w, h, bits, cfg.group_size, cfg.symmetric, cfg.clip_grid, cfg.max_shrink) \
                    if cfg.clip_search else None
                q = m.quantize_int(w, bits, cfg.group_size, cfg.symmetric, ratio=ratio)
                ql = install_quantized(model, n, lin, q, cfg.format, cfg.group_size, cfg.symmetric, 0, act)
                deq = ql.dequantized_weight()
                if not torch.isfinite(deq).all():
                    raise PassError("quantize_awq", [], f"{n}: dequantized weight has NaN/Inf")
                rep = report.setdefault(n, {"alpha": None, "err_ratio": 1.0})
                rep["sqnr_db"] = round(m.sqnr_db(w, deq), 3)
                if ratio is not None:
                    rep["clip_mean"] = round(float(ratio.mean()), 4)

    run_blocks("quantize_awq", model, batches, work, ctx, no_tokens, "statistics")
    ratios = sorted(r["err_ratio"] for r in report.values())
    scaled = sum(r["alpha"] is not None for r in report.values())
    info = {"layers_quantized": len(report), "layers_skipped_ragged": skipped,
            "layers_scaled": scaled, "output_error_vs_rtn_median": ratios[len(ratios) // 2],
            "calibration_tokens": int(batches.numel()), "experts_without_tokens": no_tokens,
            "sqnr_db_median": sorted(r["sqnr_db"] for r in report.values())[len(report) // 2],
            "sqnr_db": {n: r["sqnr_db"] for n, r in report.items()}}
    ctx.logger.info("quantize_awq: %d layers (%d rescaled); median output error %.2fx RTN's before clipping",
                    len(report), scaled, info["output_error_vs_rtn_median"])
    info.update(calibrate_static("quantize_awq", handle, cfg.activations, ctx))
    return PassResult(info=info)
