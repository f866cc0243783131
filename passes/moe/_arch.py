"""The MoE architectures the expert passes understand, and how to read and rewrite their blocks.

transformers gives every supported architecture the same sparse block: a router `gate` (a [E, H] `weight`, its
forward returns (logits, top-k weights, top-k indices)) and an `experts` module (fused 3-D `gate_up_proj`
[E, 2I, H] / `down_proj` [E, H, I], or our per-expert `LinearExperts` after `compressor.moe.unfuse_experts`),
plus optionally a shared expert that every token passes through and that the passes never touch. What differs is
the config key holding the expert count and how router scores become weights:

  mixtral      softmax over experts, top-k, renormalised to sum 1       num_local_experts
  qwen2_moe    softmax, top-k, renormalised if norm_topk_prob; shared   num_experts
  qwen3_moe    softmax, top-k, renormalised if norm_topk_prob           num_experts
  olmoe        softmax, top-k, renormalised if norm_topk_prob           num_experts
  deepseek_v3  sigmoid + correction bias, top-k (one expert group), shared experts      n_routed_experts

Removing router rows therefore renormalises as the architecture does by construction: softmax routers spread
the removed experts' probability over the kept ones, sigmoid routers score each expert alone. transformers
configs hold one expert count for all layers, so every layer keeps the same number of experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    model_type: str
    count_key: str  # config key of the routed expert count
    scoring: str  # "softmax" | "sigmoid"
    shared: str | None  # attribute of the block holding the shared expert(s)


ARCHS: dict[str, Arch] = {a.model_type: a for a in [
    Arch("mixtral", "num_local_experts", "softmax", None),
    Arch("qwen2_moe", "num_experts", "softmax", "shared_expert"),
    Arch("qwen3_moe", "num_experts", "softmax", None),
    Arch("olmoe", "num_experts", "softmax", None),
    Arch("deepseek_v3", "n_routed_experts", "sigmoid", "shared_experts"),
]}
_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


class ArchError(ValueError):
    """The model is not MoE, or not an MoE architecture these passes know. One line, naming it."""


@dataclass
class MoEBlock:
    name: str  # qualified name, e.g. "model.layers.0.mlp"
    module: nn.Module

    @property
    def gate(self) -> nn.Module:
        return self.module.gate

    @property
    def experts(self) -> nn.Module:
        return self.module.experts

    @property
    def num_experts(self) -> int:
        return int(self.gate.weight.shape[0])


def supported() -> str:
    return ", ".join(ARCHS)


def arch_of(model) -> Arch:
    cfg = model.config
    mt = getattr(cfg, "model_type", type(model).__name__)
    arch = ARCHS.get(mt)
    if arch is None:
        is_moe = any((getattr(cfg, k, None) or 0) > 1 for k in _COUNT_KEYS[:-1]) or any(
            n.endswith(".experts") for n, _ in model.named_modules())
        if not is_moe:
            raise ArchError(f"{type(model).__name__} (model_type {mt}) is not a mixture-of-experts model; the "
                            f"expert passes take {supported()}")
        raise ArchError(f"unsupported MoE architecture {mt} ({type(model).__name__}); supported: {supported()}")
    if arch.model_type == "deepseek_v3" and getattr(cfg, "n_group", 1) != 1:
        raise ArchError(f"deepseek_v3 with n_group {cfg.n_group}: group-limited routing needs the same expert "
                        "count in every group, which trimming does not keep; supported: n_group 1")
    return arch


def moe_blocks(model, arch: Arch) -> list[MoEBlock]:
    """The sparse MoE blocks (router + routed experts), in model order. Dense layers are skipped."""
    out = []
    for name, mod in model.named_modules():
        gate, experts = getattr(mod, "gate", None), getattr(mod, "experts", None)
        w = getattr(gate, "weight", None)
        if experts is not None and isinstance(w, torch.Tensor) and w.dim() == 2:
            out.append(MoEBlock(name, mod))
    if not out:
        raise ArchError(f"{type(model).__name__} ({arch.model_type}) has no sparse MoE block with a router")
    return out


def top_k(model) -> int:
    return int(model.config.num_experts_per_tok)


def router_probs(arch: Arch, logits: torch.Tensor) -> torch.Tensor:
    """(T, E) router logits -> (T, E) per-token shares summing to 1 (softmax, or sigmoid scores normalised)."""
    logits = logits.float()
    if arch.scoring == "sigmoid":
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True).clamp_min(1e-20)
    return logits.softmax(-1)


def is_fused(experts: nn.Module) -> bool:
    from compressor.moe import _is_fused

    return _is_fused(experts)


def expert_forward(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's output (T, H) on tokens x (T, H), without routing weights."""
    if is_fused(experts):
        from compressor.moe_export import _expert_mlp

        return _expert_mlp(experts, x, e)
    return experts[e](x)


# --- rewriting ----------------------------------------------------------------------------------------------


def _check_float(block: MoEBlock, what: str) -> None:
    if not is_fused(block.experts):
        for mod in block.experts.modules():
            if hasattr(mod, "weight_packed"):
                raise ArchError(f"{block.name}: experts are already quantized; run {what} before quantization")


def set_count(model, arch: Arch, count: int) -> None:
    """Update the config (and so the checkpoint) to `count` routed experts per layer."""
    setattr(model.config, arch.count_key, count)


def select(block: MoEBlock, keep: list[int]) -> None:
    """Keep experts `keep` (in this order) of one block: router rows, correction bias and expert weights."""
    idx = torch.tensor(keep, dtype=torch.long)
    gate = block.gate
    with torch.no_grad():
        gate.weight = nn.Parameter(gate.weight.data[idx].clone(), requires_grad=False)
        bias = getattr(gate, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            gate.e_score_correction_bias = bias[idx].clone()
    gate.num_experts = len(keep)
    ex = block.experts
    if is_fused(ex):
        with torch.no_grad():
            for pname in ("gate_up_proj", "down_proj", "up_proj", "gate_up_proj_bias", "down_proj_bias",
                          "up_proj_bias"):
                t = getattr(ex, pname, None)
                if isinstance(t, torch.Tensor):
                    setattr(ex, pname, nn.Parameter(t.data[idx].clone(), requires_grad=False))
        ex.num_experts = len(keep)
    else:
        from compressor.moe import LinearExperts

        new = LinearExperts([ex[i] for i in keep])
        block.module.experts = new


def expert_weights(block: MoEBlock, e: int) -> dict[str, torch.Tensor]:
    """Float weights of one expert as {"gate": (I, H), "up": (I, H), "down": (H, I)}."""
    _check_float(block, "expert_merge")
    ex = block.experts
    if is_fused(ex):
        if getattr(ex, "is_transposed", False) or getattr(ex, "has_bias", False) or not getattr(ex, "has_gate", True):
            raise ArchError(f"{block.name}: {type(ex).__name__} is not a gated, untransposed, bias-free expert")
        gu = ex.gate_up_proj.data[e]
        inter = gu.shape[0] // 2
        return {"gate": gu[:inter], "up": gu[inter:], "down": ex.down_proj.data[e]}
    m = ex[e]
    return {"gate": m.gate_proj.weight.data, "up": m.up_proj.weight.data, "down": m.down_proj.weight.data}


def set_expert_weights(block: MoEBlock, e: int, w: dict[str, torch.Tensor]) -> None:
    ex = block.experts
    with torch.no_grad():
        if is_fused(ex):
            inter = w["gate"].shape[0]
            ex.gate_up_proj.data[e, :inter].copy_(w["gate"])
            ex.gate_up_proj.data[e, inter:].copy_(w["up"])
            ex.down_proj.data[e].copy_(w["down"])
        else:
            m = ex[e]
            m.gate_proj.weight.data.copy_(w["gate"])
            m.up_proj.weight.data.copy_(w["up"])
            m.down_proj.weight.data.copy_(w["down"])


def set_router_row(block: MoEBlock, e: int, row: torch.Tensor, bias: float | None = None) -> None:
    with torch.no_grad():
        block.gate.weight.data[e].copy_(row)
        b = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None and isinstance(b, torch.Tensor):
            b[e] = bias
