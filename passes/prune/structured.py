"""prune_structured: structured pruning of a Llama-style causal LM (Llama, Qwen2, Mistral) into a smaller,
ordinary Hugging Face model: weights physically removed, config updated, no masks. The result saves and loads
with `AutoModelForCausalLM.from_pretrained` like any other checkpoint. Run it before quantization passes.

Three axes, combinable; each uniform across layers (one config value), the kept units chosen per layer:
- MLP channels: `mlp_ratio` (fraction to remove) or a target `intermediate_size`; the kept count is rounded to
  a multiple of `round_to`. Removes rows of gate_proj/up_proj and columns of down_proj.
- attention heads: `heads_ratio`, or targets `num_attention_heads` / `num_key_value_heads`. GQA groups stay
  equal: `heads_unit: query` removes the same number of query heads from every KV group, `kv_group` removes
  whole KV groups with their query heads (with multi-head attention every head is its own group). head_dim is
  kept and written to the config.
- layers: `drop_layers: N` (the N least important) or `layers_to_drop: [i, ...]`; layer_idx and layer_types
  are renumbered so the KV cache works.

Importance (`importance`), estimated once from the original model:
- activation (Minitron, ShortGPT): one forward of the calibration windows with hooks. Channel: |act_fn(gate) *
  up|; head: L2 norm of the head's attention output (o_proj's input); layer: Block Influence, 1 - cos(block
  input, block output). Each is the mean over all calibration tokens (batch and sequence).
- magnitude: L2 norm of each unit's weights (no calibration). Not defined for whole layers: with magnitude,
  give `layers_to_drop` explicitly.

The plan's size estimate accounts for MLP channels and layers, not heads.

Example (SmolLM2-135M: intermediate 1536 -> 1152, 30 -> 28 layers):

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 64, seq_len: 512}
    passes:
      - pass: prune_structured
        importance: activation
        mlp_ratio: 0.25
        round_to: 64
        drop_layers: 2
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass

NAME = "prune_structured"
_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


class StructuredConfig(BaseModel):
    """Structured pruning: MLP channels, attention heads, whole layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="activation: calibration statistics (Minitron / Block Influence); magnitude: "
        "weight L2 norms, no calibration, not for drop_layers")
    mlp_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of intermediate channels to remove")
    intermediate_size: int | None = Field(None, gt=0, description="target intermediate size (multiple of round_to)")
    round_to: int = Field(64, gt=0, description="kept intermediate size is a multiple of this")
    heads_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of attention heads to remove")
    heads_unit: Literal["query", "kv_group"] = Field(
        "query", description="heads_ratio removes query heads within each KV group, or whole KV groups")
    num_attention_heads: int | None = Field(None, gt=0, description="target number of query heads")
    num_key_value_heads: int | None = Field(None, gt=0, description="target number of KV heads (groups)")
    drop_layers: int | None = Field(None, ge=0, description="remove this many least important decoder layers")
    layers_to_drop: list[int] | None = Field(None, description="remove exactly these decoder layers (0-based)")
    batch_size: int = Field(8, gt=0, description="calibration windows per forward pass")

    @model_validator(mode="after")
    def _check(self) -> "StructuredConfig":
        pairs = [("mlp_ratio", "intermediate_size"), ("heads_ratio", "num_attention_heads"),
                 ("heads_ratio", "num_key_value_heads"), ("drop_layers", "layers_to_drop")]
        for a, b in pairs:
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        if self.intermediate_size is not None and self.intermediate_size % self.round_to:
            raise ValueError(f"intermediate_size {self.intermediate_size} is not a multiple of round_to {self.round_to}")
        nh, nkv = self.num_attention_heads, self.num_key_value_heads
        if nh is not None and nkv is not None and nh % nkv:
            raise ValueError(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}: "
                             "GQA groups must stay equal")
        if self.layers_to_drop is not None:
            if any(i < 0 for i in self.layers_to_drop) or len(set(self.layers_to_drop)) != len(self.layers_to_drop):
                raise ValueError(f"layers_to_drop {self.layers_to_drop} must be distinct layer indices >= 0")
        if self.drop_layers and self.importance == "magnitude":
            raise ValueError("drop_layers needs importance: activation (weight magnitude says nothing about a "
                             "whole layer); or list the layers in layers_to_drop")
        if not (self.mlp_axis or self.heads_axis or self.layers_axis):
            raise ValueError("nothing to prune: set mlp_ratio or intermediate_size, heads_ratio or "
                             "num_attention_heads/num_key_value_heads, drop_layers or layers_to_drop")
        return self

    @property
    def mlp_axis(self) -> bool:
        return self.mlp_ratio is not None or self.intermediate_size is not None

    @property
    def heads_axis(self) -> bool:
        return self.heads_ratio is not None or self.num_attention_heads is not None or self.num_key_value_heads is not None

    @property
    def layers_axis(self) -> bool:
        return bool(self.drop_layers) or bool(self.layers_to_drop)

    @property
    def needs_scores(self) -> bool:
        """Activation statistics are needed to choose channels, heads or layers (not for an explicit list)."""
        return self.importance == "activation" and (self.mlp_axis or self.heads_axis or bool(self.drop_layers))


def _fail(msg: str) -> PassError:
    return PassError(NAME, [], msg, exit_code=2)


def _check_model(model) -> None:
    """Refuse quantized models and architectures without Llama's module names, in one line."""
    from torch import nn

    from compressor.kernels.qlinear import QuantLinear

    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            raise _fail(f"{name} is already quantized (QuantLinear): structured pruning must run before "
                        "quantization passes")
    arch = type(model).__name__
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise _fail(f"{arch} is not supported: no model.layers of decoder blocks (Llama-style models only: "
                    "Llama, Qwen2, Mistral)")
    for i, blk in enumerate(layers):
        for part, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            for n in names:
                if type(getattr(getattr(blk, part, None), n, None)) is not nn.Linear:
                    raise _fail(f"{arch} is not supported: model.layers.{i}.{part}.{n} is not a Linear "
                                "(Llama-style models only: Llama, Qwen2, Mistral)")


def _head_dim(model) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _resolve(cfg: StructuredConfig, n_layers: int, inter: int, nh: int, nkv: int) -> dict:
    """Counts to keep on each axis, checked against the model: {inter, kv, per_group, drop (list or int)}."""
    from compressor.passes.prune._structured_math import kept_count

    out: dict = {"inter": inter, "kv": nkv, "per_group": nh // nkv, "drop": []}
    if cfg.intermediate_size is not None:
        if cfg.intermediate_size > inter:
            raise _fail(f"intermediate_size {cfg.intermediate_size} is larger than the model's {inter}")
        out["inter"] = cfg.intermediate_size
    elif cfg.mlp_ratio is not None:
        out["inter"] = kept_count(inter, cfg.mlp_ratio, cfg.round_to)
        if out["inter"] <= 0:
            raise _fail(f"mlp_ratio {cfg.mlp_ratio} would remove all {inter} intermediate channels (the kept "
                        f"count rounds to 0 with round_to {cfg.round_to})")
        out["inter"] = min(out["inter"], inter)
        if cfg.mlp_ratio > 0 and out["inter"] == inter:
            raise _fail(f"mlp_ratio {cfg.mlp_ratio} removes no channel: {inter} intermediate channels round to "
                        f"{inter} with round_to {cfg.round_to}; raise mlp_ratio or lower round_to")
    g = nh // nkv
    if cfg.heads_ratio is not None:
        if cfg.heads_unit == "query" and g > 1:
            out["per_group"] = kept_count(g, cfg.heads_ratio)
            what = f"all {g} query heads of each KV group"
        else:
            out["kv"] = kept_count(nkv, cfg.heads_ratio)
            what = f"all {nkv} KV groups"
        if min(out["per_group"], out["kv"]) <= 0:
            raise _fail(f"heads_ratio {cfg.heads_ratio} would remove {what}")
        if cfg.heads_ratio > 0 and (out["kv"], out["per_group"]) == (nkv, g):
            raise _fail(f"heads_ratio {cfg.heads_ratio} removes no head: {what.removeprefix('all ')} round to "
                        "the same count; raise heads_ratio")
    elif cfg.num_attention_heads is not None or cfg.num_key_value_heads is not None:
        t_kv, t_nh = cfg.num_key_value_heads, cfg.num_attention_heads
        if t_kv is not None and t_kv > nkv:
            raise _fail(f"num_key_value_heads {t_kv} is larger than the model's {nkv}")
        if t_nh is not None and t_nh > nh:
            raise _fail(f"num_attention_heads {t_nh} is larger than the model's {nh}")
        if t_kv is None:  # keep the groups; with multi-head attention each head is its own group
            t_kv = t_nh if g == 1 else nkv
        t_nh = t_nh if t_nh is not None else t_kv * g
        if t_nh % t_kv or t_nh // t_kv > g:
            raise _fail(f"num_attention_heads {t_nh} does not keep {t_kv} equal GQA groups of at most {g} query "
                        f"heads (the model has {nh} query heads in {nkv} groups)")
        out["kv"], out["per_group"] = t_kv, t_nh // t_kv
    if cfg.layers_to_drop:
        bad = [i for i in cfg.layers_to_drop if i >= n_layers]
        if bad:
            raise _fail(f"layers_to_drop: layer {bad[0]} is out of range (the model has {n_layers} layers)")
        out["drop"] = sorted(cfg.layers_to_drop)
    elif cfg.drop_layers:
        out["drop"] = cfg.drop_layers
    n_drop = out["drop"] if isinstance(out["drop"], int) else len(out["drop"])
    if n_drop >= n_layers:
        key = "drop_layers" if cfg.drop_layers else "layers_to_drop"
        raise _fail(f"{key} would remove all {n_layers} decoder layers")
    return out


def _activation_scores(model, batches, cfg: StructuredConfig, head_dim: int, ctx) -> tuple[dict, int]:
    """One forward of the calibration windows through the original model with hooks -> per-layer means over
    tokens: {"channels": [(I,)], "heads": [(nh,)], "bi": (L,)} and the token count."""
    import torch

    from compressor.passes.prune import _structured_math as sm

    blocks = model.model.layers
    L = len(blocks)
    ch, hd, bi = [0.0] * L, [0.0] * L, torch.zeros(L, dtype=torch.float64)
    hooks = []

    def add(i: int) -> None:
        def on_down(mod, args):
            ch[i] = ch[i] + sm.channel_activation_sum(args[0])

        def on_o(mod, args):
            hd[i] = hd[i] + sm.head_activation_sum(args[0], head_dim)

        def on_block(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            bi[i] += sm.block_influence_sum(x, out[0] if isinstance(out, tuple) else out)

        blk = blocks[i]
        if cfg.mlp_axis:
            hooks.append(blk.mlp.down_proj.register_forward_pre_hook(on_down))
        if cfg.heads_axis:
            hooks.append(blk.self_attn.o_proj.register_forward_pre_hook(on_o))
        hooks.append(blk.register_forward_hook(on_block, with_kwargs=True))

    for i in range(L):
        add(i)
    device = next(model.parameters()).device
    chunks = list(torch.split(batches, cfg.batch_size))
    try:
        with torch.no_grad():
            for chunk in ctx.progress(chunks, total=len(chunks), desc="importance", unit="batch"):
                model.model(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    n = int(batches.numel())
    scores = {"channels": [c / n for c in ch] if cfg.mlp_axis else None,
              "heads": [h / n for h in hd] if cfg.heads_axis else None, "bi": bi / n}
    for i in range(L):
        for key in ("channels", "heads"):
            if scores[key] is not None and not torch.isfinite(scores[key][i]).all():
                raise PassError(NAME, [], f"model.layers.{i}: {key} importance is NaN/Inf (activations overflow)")
    return scores, n


def _config_values(c) -> dict:
    keys = ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    return {k: getattr(c, k, None) for k in keys}


@register_pass(NAME, config=StructuredConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=lambda c: c.needs_scores, memory_factor=1.1,
               output_bytes=lambda c, t: _estimate(c, t),
               not_after=("quantize_*", "prune"))  # float weights; an unstructured prune's record would go stale
def run(handle, cfg: StructuredConfig, ctx) -> PassResult:
    import torch

    from compressor.passes.prune import _structured_math as sm

    model, mc = handle.model, handle.model.config
    _check_model(model)
    blocks = model.model.layers
    L, d = len(blocks), _head_dim(model)
    inter, nh, nkv = mc.intermediate_size, mc.num_attention_heads, mc.num_key_value_heads
    for i, blk in enumerate(blocks):  # the config must describe the weights, or the slicing would be wrong
        a, m = blk.self_attn, blk.mlp
        for name, got, want in (("self_attn.q_proj", a.q_proj.out_features, nh * d),
                                ("self_attn.k_proj", a.k_proj.out_features, nkv * d),
                                ("mlp.gate_proj", m.gate_proj.out_features, inter)):
            if got != want or nh % nkv:
                raise _fail(f"model.layers.{i}.{name} has {got} outputs but the config implies {want} "
                            f"({nh} heads, {nkv} KV heads, head_dim {d}, intermediate_size {inter})")
    t = _resolve(cfg, L, inter, nh, nkv)
    before, params_before = _config_values(mc), handle.num_parameters()

    scores, tokens = None, 0
    if cfg.needs_scores:
        if ctx.calibration is None:
            raise _fail("importance: activation needs calibration data (a `calibration:` section)")
        batches = ctx.calibration()
        ctx.logger.info("%s: importance from %d x %d calibration tokens", NAME, *batches.shape)
        scores, tokens = _activation_scores(model, batches, cfg, d, ctx)

    drop = t["drop"] if isinstance(t["drop"], list) else sm.layers_to_drop(scores["bi"], t["drop"])
    per_layer: dict[str, dict] = {}
    for i, blk in enumerate(blocks):
        info = per_layer.setdefault(str(i), {})
        if scores is not None:
            info["block_influence"] = round(float(scores["bi"][i]), 6)
        if i in drop:
            info["dropped"] = True
            continue
        attn, mlp = blk.self_attn, blk.mlp
        if cfg.heads_axis and (t["kv"], t["per_group"]) != (nkv, nh // nkv):
            if scores is not None:
                hs = scores["heads"][i]
                gs = sm.group_scores(hs, nkv)
            else:
                hs, gs = sm.head_magnitude(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                           attn.o_proj.weight, d)
            q_idx, kv_idx = sm.select_heads(hs, gs, t["kv"], t["per_group"])
            for lin, idx, dim in ((attn.q_proj, q_idx, 0), (attn.k_proj, kv_idx, 0), (attn.v_proj, kv_idx, 0),
                                  (attn.o_proj, q_idx, 1)):
                sm.slice_linear(lin, sm.head_rows(idx, d), dim)
            attn.num_key_value_groups = t["per_group"]
            info["heads_kept"] = q_idx.tolist()
            info["kv_heads_kept"] = kv_idx.tolist()
            info["head_importance_kept"] = round(float(hs[q_idx].sum() / hs.sum().clamp_min(1e-30)), 4)
        if cfg.mlp_axis and t["inter"] != inter:
            if scores is not None:
                cs = scores["channels"][i]
            else:
                cs = sm.channel_magnitude(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            keep = sm.top_indices(cs, t["inter"])
            for lin, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
                sm.slice_linear(lin, keep, dim)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = t["inter"]
            info["mlp_importance_kept"] = round(float(cs[keep].sum() / cs.sum().clamp_min(1e-30)), 4)

    kept = [i for i in range(L) if i not in drop]
    model.model.layers = torch.nn.ModuleList([blocks[i] for i in kept])
    for new, blk in enumerate(model.model.layers):  # the KV cache is indexed by layer_idx
        for mod in (blk, blk.self_attn):
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    mc.num_hidden_layers = len(kept)
    if getattr(mc, "layer_types", None) is not None:
        mc.layer_types = [mc.layer_types[i] for i in kept]
    mc.intermediate_size = t["inter"]
    mc.num_key_value_heads, mc.num_attention_heads = t["kv"], t["kv"] * t["per_group"]
    mc.head_dim = d  # no longer hidden_size // num_attention_heads

    params_after = handle.num_parameters()
    info = {"importance": cfg.importance, "params_before": params_before, "params_after": params_after,
            "params_removed": params_before - params_after,
            "fraction_removed": round((params_before - params_after) / params_before, 6),
            "config_before": before, "config": _config_values(mc), "layers_dropped": drop,
            "calibration_tokens": tokens, "per_layer": per_layer}
    ctx.logger.info("%s: %d -> %d parameters (%.1f%% removed); layers %d -> %d, intermediate %d -> %d, "
                    "heads %d/%d -> %d/%d", NAME, params_before, params_after, 100 * info["fraction_removed"],
                    L, len(kept), inter, t["inter"], nh, nkv, mc.num_attention_heads, mc.num_key_value_heads)
    return PassResult(info=info)


def _estimate(cfg: StructuredConfig, tensors: list) -> list:
    """For the plan, from checkpoint headers: MLP channels and dropped layers removed, layers renumbered (heads
    not estimated; drop_layers counts as the last layers, all layers being the same size)."""
    from compressor.passes.prune._structured_math import kept_count

    layer_of = {n: int(m.group(1)) for n, _, _ in tensors if (m := re.search(r"\.layers\.(\d+)\.", n))}
    n_layers = max(layer_of.values(), default=-1) + 1
    drop = set(cfg.layers_to_drop or range(n_layers - (cfg.drop_layers or 0), n_layers))
    inter = next((s[0] for n, s, _ in tensors if n.endswith("mlp.gate_proj.weight")), None)
    keep = inter
    if inter and cfg.intermediate_size is not None:
        keep = min(cfg.intermediate_size, inter)
    elif inter and cfg.mlp_ratio is not None:
        keep = min(max(kept_count(inter, cfg.mlp_ratio, cfg.round_to), 1), inter)
    renumber = {i: j for j, i in enumerate(i for i in range(n_layers) if i not in drop)}
    out = []
    for name, shape, nbytes in tensors:
        i = layer_of.get(name)
        if i in drop:
            continue
        if i is not None:
            name = name.replace(f".layers.{i}.", f".layers.{renumber[i]}.", 1)
        if inter and any(f"mlp.{p}." in name for p in _MLP):
            nbytes = nbytes * keep // inter
            shape = tuple(keep if s == inter else s for s in shape)
        out.append((name, shape, nbytes))
    return out
