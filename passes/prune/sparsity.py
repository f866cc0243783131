"""prune: unstructured or N:M (2:4, 4:8) weight sparsity for the Linear layers of the decoder blocks (attention,
MLP, and each MoE expert's Linears; routers, embeddings and lm_head are never pruned).

Methods:
- magnitude: drop the smallest |W| of each output row. No calibration.
- wanda (Sun et al., 2023): drop the lowest |W_ij| * ||X_j||_2 of each output row (X_j: input feature j over the
  calibration tokens); no weight update.
- sparsegpt (Frantar & Alistarh, 2023): Hessian-based (H = 2 X^T X, dampened as in GPTQ), the mask chosen
  adaptively per column block (per group of M columns for N:M), the remaining weights updated to absorb the
  error.

wanda and sparsegpt are calibrated layer-sequentially: block i+1 is calibrated on the outputs of the already
pruned block i. Every row of a pruned layer loses exactly round(sparsity x width) weights; with `pattern: "N:M"`
every M consecutive input weights of a row keep at most N nonzeros (2:4 = 50%, the pattern sparse tensor cores
run). The pruned weights are stored as zeros in the dense tensors: model bytes do not change (the report says
so); the speed-up needs a sparse kernel at deployment (2:4 on TensorRT). The layers pruned and their pattern are
recorded on the model (`_compressor_sparsity`) and in its config (`compressor_sparsity`, saved in config.json)
for export; quantize_gptq after prune keeps the pruned weights at exactly zero.

Example (SmolLM2: widths 576 and 1536 are multiples of 4 and 8):

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 128, seq_len: 512}
    passes:
      - pass: prune
        method: sparsegpt        # magnitude | wanda | sparsegpt
        pattern: "2:4"           # or sparsity: 0.5 (unstructured)
        dampening_frac: 0.01
        block_size: 128

Per-layer unstructured sparsity (first matching pattern wins; other layers get `sparsity`):

      - pass: prune
        method: wanda
        sparsity: 0.5
        layer_sparsity: {"*.self_attn.*": 0.3, "model.layers.0.*": 0.2}
        ignore: ["lm_head", "*.mlp.down_proj"]
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass

NAME = "prune"
# Routers pick experts; pruning them would change which experts run. They are not nn.Linear in Mixtral, but are in
# some MoE models, so they are excluded by name.
_ROUTERS = ("*.mlp.gate", "*.router", "*.shared_expert_gate")
_IN_BLOCK = re.compile(r"\.layers\.\d+\.")


class PruneConfig(BaseModel):
    """Unstructured or N:M weight pruning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        description="magnitude (|W|, no calibration), wanda (|W| x input norm), sparsegpt (Hessian + weight update)")
    sparsity: float | None = Field(None, description="unstructured: fraction of each row's weights set to zero, "
                                   "in [0, 1); give this or `pattern`")
    pattern: str | None = Field(None, description='semi-structured "N:M": N kept of every M consecutive input '
                                'weights of a row ("2:4", "4:8"); give this or `sparsity`')
    layer_sparsity: dict[str, float] = Field(default_factory=dict, description="fnmatch pattern of layer names -> "
                                             "sparsity, first match wins; other layers get `sparsity`")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="fnmatch patterns of layer names "
                              "to keep dense")
    dampening_frac: float = Field(0.01, ge=0, description="sparsegpt: added to H's diagonal, as a fraction of its mean")
    block_size: int = Field(128, gt=0, description="sparsegpt: columns per mask-selection block and lazy update "
                            "(N:M: rounded down to a multiple of M)")
    max_damp_retries: int = Field(5, ge=0, description="sparsegpt: times dampening is raised 10x if H is not "
                                  "positive definite")

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v):
        if v is not None and not 0 <= v < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {v}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        if v is not None:
            from compressor.passes.prune._sparsity_math import parse_pattern

            n, m = parse_pattern(v)
            return f"{n}:{m}"
        return v

    @field_validator("layer_sparsity")
    @classmethod
    def _layer_sparsity(cls, v):
        for pat, s in v.items():
            if not 0 <= s < 1:
                raise ValueError(f"layer_sparsity {pat!r}: sparsity must be in [0, 1), got {s}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "PruneConfig":
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of `sparsity` (unstructured, e.g. 0.5) and `pattern` (N:M, e.g. "
                             f"\"2:4\"); got {'both' if self.pattern else 'neither'}")
        if self.pattern and self.layer_sparsity:
            raise ValueError("layer_sparsity is for unstructured `sparsity`; with `pattern` every pruned layer "
                             "gets the same N:M pattern (keep layers dense with `ignore`)")
        extra = {"dampening_frac", "block_size", "max_damp_retries"} & self.model_fields_set
        if self.method != "sparsegpt" and extra:
            raise ValueError(f"{', '.join(sorted(extra))} only apply to method sparsegpt (method is {self.method})")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def sparsity_for(self, name: str) -> float:
        """Unstructured sparsity of layer `name`: the first matching layer_sparsity pattern, else `sparsity`."""
        return next((s for p, s in self.layer_sparsity.items() if fnmatch.fnmatchcase(name, p)), self.sparsity or 0.0)


def _skipped(name: str, ignore: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in (*ignore, *_ROUTERS))


def _width_error(name: str, width: int, pattern: str, more: int = 0) -> PassError:
    others = f" (and {more} more layers)" if more else ""
    return PassError(NAME, [], f"pattern {pattern}: M={pattern.split(':')[1]} does not divide the input width "
                     f"{width} of layer {name}{others}; keep such layers dense with `ignore`, or pick an M that "
                     "divides their width", exit_code=2)


def output_bytes(cfg: PruneConfig, tensors: list) -> list:
    """Dense storage: the zeros are stored, so every tensor keeps its bytes. Also checks at plan time, from the
    checkpoint's headers, that M divides the input width (last dimension) of every weight in a decoder block."""
    if cfg.nm:
        ragged = [(name.removesuffix(".weight"), shape[-1]) for name, shape, _ in tensors
                  if len(shape) >= 2 and _IN_BLOCK.search(name) and shape[-1] % cfg.nm[1]
                  and not _skipped(name.removesuffix(".weight"), cfg.ignore)]
        if ragged:
            raise _width_error(*ragged[0], cfg.pattern, len(ragged) - 1)
    return tensors


@register_pass(NAME, config=PruneConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=lambda c: c.method != "magnitude", memory_factor=1.2, output_bytes=output_bytes,
               not_after=("quantize_*",))
def run(handle, cfg: PruneConfig, ctx) -> PassResult:
    from compressor.calibration.forward_loop import decoder_blocks
    from compressor.passes.quantize._layers import prepare

    model = handle.model
    if cfg.method != "magnitude" and ctx.calibration is None:
        raise PassError(NAME, [], f"method {cfg.method} needs calibration data (a `calibration:` section)", exit_code=2)
    prepare(model, ctx.logger)  # fused MoE experts -> per-expert Linears, pruned like any other layer
    blocks = decoder_blocks(model)
    prefix = next(n for n, mod in model.named_modules() if mod is blocks)
    plan = _plan_layers(cfg, blocks, prefix)
    before = _count_nonzero(model)
    stats: dict[str, dict] = {}
    no_tokens: dict[str, str] = {}

    def prune_block(i: int, xstats: dict | None) -> None:
        for name, lin, s in plan[i]:
            stats[name] = _prune_layer(cfg, name, lin, s, xstats, [n for n, _, _ in plan[i]], no_tokens, ctx)

    tokens = 0  # sparsity 0 everywhere (a sweep's dense point) leaves every block's list empty: nothing runs
    if any(plan) and cfg.method == "magnitude":
        for i in ctx.progress(range(len(blocks)), total=len(blocks), desc=NAME, unit="block"):
            prune_block(i, None)
    elif any(plan):
        from compressor.passes.quantize._hessians import collect
        from compressor.passes.quantize._layers import run_blocks

        batches = ctx.calibration()
        tokens = int(batches.numel())

        # Wanda needs only ||X_j||: per-channel sums of squares, not SparseGPT's full X^T X (d^2 memory and work
        # per layer; q/k/v and gate/up share one).
        gather = _sum_squares if cfg.method == "wanda" else collect

        def work(i: int, block, run_block) -> None:
            with gather([(n, lin) for n, lin, _ in plan[i]]) as xstats:
                run_block()
            prune_block(i, xstats)

        run_blocks(NAME, model, batches, work, ctx, no_tokens, "input statistics")

    kind = cfg.pattern or "unstructured"
    recorded = dict(getattr(model.config, "compressor_sparsity", None) or {})  # an earlier prune's, if any
    recorded.update({n: kind for n in stats})
    model._compressor_sparsity = recorded  # for export (2:4 for TensorRT)
    # The config copy is saved in config.json, so it survives the stage cache and checkpoints; GPTQ reads it to
    # keep the pruned weights at zero.
    model.config.compressor_sparsity = dict(recorded)
    after = _count_nonzero(model)
    info = _summary(cfg, stats, before, after, tokens, no_tokens)
    ctx.logger.info("%s: %s %s on %d layers: %.2f%% of their weights zero; nonzero parameters %d -> %d",
                    NAME, cfg.method, kind, len(stats), 100 * info["achieved_sparsity"], before[0], after[0])
    return PassResult(info=info)


def _plan_layers(cfg: PruneConfig, blocks, prefix: str) -> list[list[tuple]]:
    """Per block: [(name, nn.Linear, sparsity)] of the layers to prune (sparsity > 0). Refuses quantized layers,
    widths M does not divide, an `ignore` that leaves no layer, and layer_sparsity patterns that match no
    layer, before any work."""
    from compressor.kernels.qlinear import QuantLinear
    from compressor.passes.quantize._layers import select_layers

    plan, used, selected = [], set(), 0
    for i, block in enumerate(blocks):
        name0 = f"{prefix}.{i}"
        quant = [n for n, mod in block.named_modules() if isinstance(mod, QuantLinear)]
        if quant:
            raise PassError(NAME, [], f"{name0}.{quant[0]} is already quantized; put prune before the "
                            "quantization passes", exit_code=2)
        layers = []
        for name, lin in select_layers(block, cfg.ignore, prefix=name0):
            if _skipped(name, cfg.ignore):
                continue
            selected += 1
            if cfg.nm and lin.in_features % cfg.nm[1]:
                raise _width_error(name, lin.in_features, cfg.pattern)
            used |= {p for p in cfg.layer_sparsity if fnmatch.fnmatchcase(name, p)}
            s = cfg.sparsity_for(name)
            if cfg.nm or s > 0:
                layers.append((name, lin, s))
        plan.append(layers)
    if not selected:
        raise PassError(NAME, [], f"no Linear layer left to prune in the decoder blocks (ignore: {cfg.ignore})",
                        exit_code=2)
    unused = [p for p in cfg.layer_sparsity if p not in used]
    if unused:
        raise PassError(NAME, [], f"layer_sparsity pattern {unused[0]!r} matches no prunable layer", exit_code=2)
    return plan


class _SumSquares:
    def __init__(self) -> None:
        self.sq, self.n = 0.0, 0

    @property
    def mean_sq(self):
        """(in,) mean of x_j^2 over the tokens: ||X_j||^2 / n."""
        return self.sq / max(self.n, 1)


@contextmanager
def _sum_squares(layers: list[tuple[str, object]]):
    """Yields {name: _SumSquares} filled while the block runs (float32 per batch, summed in float64)."""
    import torch

    from compressor.calibration.stats import NonFiniteActivation

    stats: dict[str, _SumSquares] = {}

    def hook_for(name):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if not torch.isfinite(x).all():
                raise NonFiniteActivation(name)
            st = stats.setdefault(name, _SumSquares())
            st.sq = st.sq + x.to(torch.float32).square().sum(0).to(torch.float64)
            st.n += x.shape[0]
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(name)) for name, mod in layers]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _layer_stat(name: str, stats: dict, names: list[str], no_tokens: dict, value):
    """value(the layer's statistics), or for an MoE expert no token reached, the mean over its siblings'."""
    import torch

    from compressor.moe import siblings

    st = stats.get(name)
    if st is not None and st.n:
        return value(st)
    sib = [stats[s] for s in siblings(name, names) if s in stats and stats[s].n]
    if not sib:
        raise PassError(NAME, [], f"{name} received no calibration tokens and no sibling expert did either; "
                        "give more calibration data")
    no_tokens[name] = f"mean input statistics of {len(sib)} sibling experts"
    return torch.stack([value(s) for s in sib]).mean(0)


def _prune_layer(cfg: PruneConfig, name: str, lin, s: float, xstats, names, no_tokens, ctx) -> dict:
    import torch

    from compressor.passes.prune import _sparsity_math as sm

    w = lin.weight.data
    zeros_before = w.numel() - int(torch.count_nonzero(w))
    out = {"dampening": None, "retries": 0}
    if cfg.method == "sparsegpt":
        from compressor.passes.prune._sparsegpt_math import sparsegpt_prune
        from compressor.passes.quantize._gptq_math import HessianNotPositiveDefinite

        h = _layer_stat(name, xstats, names, no_tokens, lambda st: st.hessian)
        try:
            r = sparsegpt_prune(w, h, None if cfg.nm else s, cfg.nm, cfg.dampening_frac, cfg.block_size,
                                cfg.max_damp_retries)
        except HessianNotPositiveDefinite as e:
            raise PassError(NAME, [], f"{name}: Hessian not positive definite after {cfg.max_damp_retries} "
                            f"retries ({e}); raise dampening_frac (now {cfg.dampening_frac}) or give more "
                            "calibration data") from None
        if not torch.isfinite(r.weight).all():
            raise PassError(NAME, [], f"{name}: updated weight has NaN/Inf")
        w.copy_(r.weight)
        out = {"dampening": r.dampening, "retries": r.retries}
        if r.retries:
            ctx.logger.warning("%s: %s: Hessian not positive definite at dampening %g; succeeded at %g after %d "
                               "retries", NAME, name, cfg.dampening_frac, r.dampening, r.retries)
    else:
        if cfg.method == "wanda":
            scores = sm.wanda_scores(w, _layer_stat(name, xstats, names, no_tokens, lambda st: st.mean_sq).sqrt())
        else:
            scores = sm.magnitude_scores(w)
        w.masked_fill_(sm.select_mask(scores, s, cfg.nm), 0)
    if cfg.nm and not sm.nm_holds(w, *cfg.nm):
        raise PassError(NAME, [], f"{name}: the pruned weight breaks the {cfg.pattern} pattern (a bug)")
    zeros = w.numel() - int(torch.count_nonzero(w))
    return {**out, "numel": w.numel(), "zeros": zeros, "pruned": zeros - zeros_before, "target": s,
            "sparsity": zeros / w.numel()}


def _count_nonzero(model) -> tuple[int, int]:
    """(nonzero, total) over the model's parameters, tied tensors counted once."""
    import torch

    ps = list(model.parameters())
    return sum(int(torch.count_nonzero(p)) for p in ps), sum(p.numel() for p in ps)


def _summary(cfg: PruneConfig, stats: dict, before, after, tokens: int, no_tokens: dict) -> dict:
    vals = sorted(st["sparsity"] for st in stats.values())
    zeros, numel = sum(st["zeros"] for st in stats.values()), sum(st["numel"] for st in stats.values())
    retried = {n: {"dampening": st["dampening"], "retries": st["retries"]} for n, st in stats.items() if st["retries"]}
    return {
        "method": cfg.method, "pattern": cfg.pattern or "unstructured", "target_sparsity": cfg.sparsity,
        "layers_pruned": len(stats), "achieved_sparsity": round(zeros / max(numel, 1), 6),
        "layer_sparsity_min": round(vals[0], 6) if vals else None,
        "layer_sparsity_median": round(vals[len(vals) // 2], 6) if vals else None,
        "layer_sparsity_max": round(vals[-1], 6) if vals else None,
        "weights_in_pruned_layers": numel, "weights_zeroed": sum(st["pruned"] for st in stats.values()),
        "parameters": before[1], "parameters_nonzero_before": before[0], "parameters_nonzero_after": after[0],
        "calibration_tokens": tokens, "dampening_retries": retried, "experts_without_tokens": no_tokens,
        "storage": "dense: pruned weights are stored as zeros, so model bytes do not change; a sparse kernel "
                   "(2:4 on TensorRT) turns the pattern into speed",
    }
