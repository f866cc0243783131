"""Mixture-of-experts plumbing shared by the passes.

transformers stores the experts of Mixtral-style models as fused 3-D parameters (`gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]). `unfuse_experts` turns each such module into one small MLP of
nn.Linear layers per expert (`experts.<e>.gate_proj/up_proj/down_proj`) computing exactly the same thing,
so quantization works per expert, calibration hooks see exactly the tokens routed to each expert, and an
expert that received no tokens can be named. Routers are not nn.Linear and so are never quantized.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.ModuleList):
    """Drop-in for a fused experts module: forward(hidden_states, top_k_index, top_k_weights)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tok, pos = torch.where(top_k_index == e)  # token rows and their top-k slot
            if tok.numel() == 0:
                continue
            y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def _is_fused(mod: nn.Module) -> bool:
    gu, d = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(d, torch.Tensor) and gu.dim() == 3 and d.dim() == 3


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module by a LinearExperts (in place). Returns how many were replaced."""
    fused = [(n, m) for n, m in model.named_modules() if _is_fused(m)]
    for name, mod in fused:
        gu, down = mod.gate_up_proj.data, mod.down_proj.data
        if getattr(mod, "has_bias", False) or getattr(mod, "gate_up_proj_bias", None) is not None:
            raise ValueError(f"{name}: experts with biases are not supported")
        n_exp, two_i, hidden = gu.shape
        inter = two_i // 2
        experts = LinearExperts()
        for e in range(n_exp):
            mlp = ExpertMLP(hidden, inter, mod.act_fn, gu.dtype)
            mlp.gate_proj.weight.data.copy_(gu[e, :inter])
            mlp.up_proj.weight.data.copy_(gu[e, inter:])
            mlp.down_proj.weight.data.copy_(down[e])
            experts.append(mlp)
        for p in experts.parameters():
            p.requires_grad_(False)
        model.set_submodule(name, experts)
    if fused and hasattr(model, "config"):
        model.config.compressor_unfused_experts = True
    return len(fused)


def sibling_pattern(name: str) -> str | None:
    """'model.layers.0.mlp.experts.3.up_proj' -> 'model.layers.0.mlp.experts.*.up_proj' (None if not an expert)."""
    return _EXPERT.sub(".experts.*.", name, count=1) if _EXPERT.search(name) else None


def siblings(name: str, names) -> list[str]:
    """The other experts' layers in the same position as `name` (same block, same projection)."""
    pat = sibling_pattern(name)
    return [] if pat is None else [n for n in names if n != name and sibling_pattern(n) == pat]
