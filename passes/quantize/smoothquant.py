"""smoothquant: migrate activation outliers into the weights before W8A8 quantization (Xiao et al., 2023).

For each mapping (a norm or Linear feeding Linear layers, see _mappings) the input channel j is divided by
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and the weights' column j multiplied by it; the model computes the
same function, but its activations are flatter and quantize better. This pass only rescales; follow it with a
quantization pass that quantizes activations (quantize_rtn / quantize_gptq with `activations:`).

Statistics (per-channel max |X| over the calibration set) are cached by content hash, so another alpha or
another activation format on the same model and data reuses them.

With `alpha_grid`, alpha is searched per mapping: each candidate is scored by the W8A8 output error of the
mapping's layers (int8 per-channel weights, per-token activations of `search_activations`) on a sample of
calibration tokens, and the best is kept (listed in the report).

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 128, seq_len: 512}
    passes:
      - pass: smoothquant
        alpha: 0.5
      - pass: quantize_rtn
        format: int8
        activations: {format: int8, dynamic: true}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass

MAPPING_KINDS = ("qkv", "o", "gate_up", "down")


class SmoothQuantConfig(BaseModel):
    """SmoothQuant activation-to-weight migration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: 0 keeps activations, 1 moves all")
    alpha_grid: list[float] | None = Field(None, description="search alpha per mapping among these values")
    search_activations: Literal["int8", "fp8"] = "int8"
    search_tokens: int = Field(1024, gt=0, description="calibration tokens per mapping used to score alphas")
    mappings: list[Literal["qkv", "o", "gate_up", "down"]] = Field(default_factory=lambda: list(MAPPING_KINDS))
    ignore: list[str] = Field(default_factory=list, description="fnmatch patterns: mappings feeding these layers are left alone")

    @field_validator("alpha_grid")
    @classmethod
    def _grid(cls, v):
        for a in v or []:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha_grid values must lie in [0, 1], got {a}")
        if v is not None and not v:
            raise ValueError("alpha_grid is empty")
        return v


def _kind(m) -> str:
    last = m.linears[0][0].rsplit(".", 1)[1]
    return {"q_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "down_proj": "down"}.get(last, last)


def _probe(m) -> str:
    """The module whose input is the mapping's input over all tokens (the router for MoE experts)."""
    return (m.passengers or m.linears)[0][0]


def _mappings(model, cfg: SmoothQuantConfig):
    import fnmatch

    from compressor.calibration.forward_loop import decoder_blocks
    from compressor.kernels.qlinear import QuantLinear
    from compressor.passes.quantize._mappings import block_mappings

    blocks = decoder_blocks(model)
    prefix = next(n for n, mod in model.named_modules() if mod is blocks)
    per_block = []
    for i, b in enumerate(blocks):
        maps = [m for m in block_mappings(b, f"{prefix}.{i}") if _kind(m) in cfg.mappings
                and not any(fnmatch.fnmatchcase(n, p) for n, _ in m.linears for p in cfg.ignore)]
        for m in maps:
            for n, lin in m.linears:
                if isinstance(lin, QuantLinear) or isinstance(m.prev, QuantLinear):
                    raise PassError("smoothquant", [], f"{n} is already quantized: run smoothquant before "
                                    "the quantization pass", exit_code=2)
        per_block.append(maps)
    return per_block


def _search_alpha(m, x_sample, x_absmax, cfg) -> tuple[float, float]:
    import torch

    from compressor.kernels.fakequant import activation_scale, fake_quant
    from compressor.passes.quantize import _rtn_math as rm
    from compressor.passes.quantize._smooth_math import smoothquant_scales, weight_absmax

    lins = [lin for _, lin in m.linears]
    ws = [lin.weight.detach().to(torch.float32) for lin in lins]
    ref = [x_sample @ w.T for w in ws]
    best = (float("inf"), cfg.alpha)
    for a in cfg.alpha_grid:
        s = smoothquant_scales(x_absmax, weight_absmax(lins), a)
        xs = x_sample / s
        xq = fake_quant(xs, cfg.search_activations, activation_scale(xs, cfg.search_activations, per_token=True))
        err = 0.0
        for w, y in zip(ws, ref):
            q = rm.quantize_int(w * s, 8, 0, True)
            wq = rm.dequantize(q, "int8", 0, True)
            err += float((xq @ wq.T - y).pow(2).sum())
        best = min(best, (err, a))
    return best[1], best[0]


@register_pass("smoothquant", config=SmoothQuantConfig, consumes=Artifact.TORCH_MODEL,
               produces=Artifact.TORCH_MODEL, needs_calibration=True, memory_factor=1.3)
def run(handle, cfg: SmoothQuantConfig, ctx) -> PassResult:
    import torch

    from compressor.calibration.stats import NonFiniteActivation, input_channel_absmax
    from compressor.moe import siblings
    from compressor.passes.quantize._layers import prepare
    from compressor.passes.quantize._smooth_math import fold, smoothquant_scales, weight_absmax

    if ctx.calibration is None:
        raise PassError("smoothquant", [], "needs calibration data (a `calibration:` section)", exit_code=2)
    prepare(handle.model, ctx.logger)
    try:
        per_block = _mappings(handle.model, cfg)
    except TypeError as e:
        raise PassError("smoothquant", [], str(e), exit_code=2) from None
    batches = ctx.calibration()
    probes = [_probe(m) for maps in per_block for m in maps]
    chosen: dict[str, float] = {}
    try:
        if cfg.alpha_grid:
            stats = _search(handle.model, per_block, batches, cfg, ctx, chosen)
        else:
            stats = input_channel_absmax(handle.model, batches, probes, ctx.cache_dir, ctx.cache_enabled,
                                         ctx.progress, ctx.logger)
    except NonFiniteActivation as e:
        raise PassError("smoothquant", [], str(e)) from None
    no_tokens = {}
    ratios = []
    with torch.no_grad():
        for maps in per_block:
            for m in maps:
                name = _probe(m)
                xa = stats.get(name)
                if xa is None:  # an MoE expert no calibration token was routed to: borrow from its siblings
                    sib = [stats[s] for s in siblings(name, stats)]
                    if not sib:
                        raise PassError("smoothquant", [], f"{name} received no calibration tokens and no sibling "
                                        "expert did either; give more calibration data")
                    xa = torch.stack(sib).amax(0)
                    no_tokens[name] = "max of sibling experts"
                lins = [lin for _, lin in m.linears]
                s = smoothquant_scales(xa, weight_absmax(lins), chosen.get(name, cfg.alpha))
                ratios.append(float(xa.max() / xa.median().clamp_min(1e-8)))
                fold(m.prev, lins, s, [p for _, p in m.passengers])
                for n, lin in m.linears:
                    if not torch.isfinite(lin.weight).all():
                        raise PassError("smoothquant", [], f"{n}: smoothing produced NaN/Inf weights")
    if no_tokens:
        ctx.logger.warning("smoothquant: %d expert layers received no calibration tokens; their statistics are "
                           "taken from sibling experts: %s", len(no_tokens), sorted(no_tokens))
    n = sum(len(x) for x in per_block)
    ctx.logger.info("smoothquant: %d mappings smoothed (alpha %s)", n,
                    "searched per mapping" if cfg.alpha_grid else cfg.alpha)
    info = {"mappings": n, "alpha": cfg.alpha if not cfg.alpha_grid else None,
            "experts_without_tokens": sorted(no_tokens)}
    if chosen:
        info["alpha_chosen"] = chosen
    return PassResult(info=info)


def _search(model, per_block, batches, cfg, ctx, chosen: dict) -> dict:
    """Layer by layer: capture each mapping's inputs, score the alphas, record the best. Returns the absmax
    statistics (over all tokens) keyed like input_channel_absmax."""
    import torch

    from compressor.calibration.forward_loop import layer_sequential
    from compressor.calibration.stats import NonFiniteActivation

    stats: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)

    def work(i, block, run_block):
        maps = per_block[i]
        rows: dict[str, list] = {}
        handles = []
        for m in maps:
            name = _probe(m)
            mod = model.get_submodule(name)

            def hook(mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                if not torch.isfinite(x).all():
                    raise NonFiniteActivation(name)
                if x.shape[0] == 0:
                    return
                a = x.abs().amax(0)
                stats[name] = a if name not in stats else torch.maximum(stats[name], a)
                k = max(1, cfg.search_tokens // len(batches))
                rows.setdefault(name, []).append(x[torch.randint(0, x.shape[0], (k,), generator=gen)])
            handles.append(mod.register_forward_pre_hook(hook))
        try:
            run_block()
        finally:
            for h in handles:
                h.remove()
        for m in maps:
            name = _probe(m)
            if name in rows:
                chosen[name], _ = _search_alpha(m, torch.cat(rows[name]), stats[name], cfg)

    layer_sequential(model, batches, work, ctx.progress)
    return stats
