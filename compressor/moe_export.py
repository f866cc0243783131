"""Export-friendly forwards for mixture-of-experts blocks (ONNX, torch dynamo exporter).

transformers 5 dispatches the forward of every fused experts module (3-D `gate_up_proj` / `down_proj`, class
decorated with `@use_experts_implementation`) through `transformers.integrations.moe.ExpertsInterface`, keyed by
the module's `config._experts_implementation`. Its default `grouped_mm` and the class's own `eager` loop do not
export with `torch.onnx.export(dynamo=True)`; `batched_mm` exports but gathers a copy of the expert weights for
every token. This module registers two forwards that export and compute the same function:

  "compressor_sparse"  loop over the experts; each gathers the tokens routed to it, runs on them alone and
                       index_adds its weighted output. Work ~ tokens * top_k; the shapes inside the loop depend
                       on the routing (data-dependent), which ONNX Runtime handles.
  "compressor_dense"   every expert runs on every token; the outputs are weighted by a dense [tokens, experts]
                       routing matrix that is zero off the top-k. Work ~ tokens * experts, but every shape is a
                       function of the input shapes only, which TensorRT needs (it rejects or de-optimizes
                       data-dependent shapes such as NonZero outputs feeding a Gather / ScatterND).

Models whose experts were split by `compressor.moe.unfuse_experts` (a `LinearExperts` of per-expert nn.Linear or
QuantLinear layers) do not go through the interface; for them `export_experts` swaps the forward of each
`LinearExperts` instance for the same two forms. The stock `LinearExperts.forward` skips experts with no tokens
(`if tok.numel() == 0`), a branch on a data-dependent size that the exporter cannot trace.

Use: `with export_experts(model, pick_mode(flavour)): export_causal_lm(model, path)`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressor.moe import LinearExperts, _is_fused

SPARSE, DENSE = "compressor_sparse", "compressor_dense"
_IMPL = {"sparse": SPARSE, "dense": DENSE}


def pick_mode(flavour: str) -> str:
    """The experts form for an export flavour. ONNX Runtime runs data-dependent shapes (NonZero, Gather of a
    variable row count) natively, so "ort" gets the sparse loop, which only computes the routed tokens.
    TensorRT builds its engine from shape profiles and handles data-dependent shapes poorly (NonZero needs
    output-size allocators, breaks layer fusion and CUDA graphs), so "tensorrt" gets the dense form, whose shapes
    follow from the input shapes alone, at the cost of running every expert on every token."""
    modes = {"ort": "sparse", "onnxruntime": "sparse", "tensorrt": "dense", "trt": "dense"}
    try:
        return modes[flavour.lower()]
    except KeyError:
        raise ValueError(f"unknown export flavour {flavour!r}; expected one of {sorted(modes)}") from None


# --- fused experts (ExpertsInterface) ---------------------------------------------------------------------


def _linear(self, x: torch.Tensor, name: str, e=None) -> torch.Tensor:
    """x @ W[e]^T (+ b[e]) for one expert e, or batched over all experts ([E, T, in] -> [E, T, out]) if e is None."""
    w = getattr(self, name)
    b = getattr(self, f"{name}_bias", None) if self.has_bias else None
    if e is not None:
        w, b = w[e], (None if b is None else b[e])
        y = x @ w if self.is_transposed else F.linear(x, w)
        return y if b is None else y + b
    y = torch.bmm(x, w if self.is_transposed else w.transpose(1, 2))
    return y if b is None else y + b[:, None]


def _expert_mlp(self, x: torch.Tensor, e=None) -> torch.Tensor:
    """What every stock experts forward computes for the tokens x: up (+gate), activation, down, post norm."""
    if self.has_gate:
        h = self._apply_gate(_linear(self, x, "gate_up_proj", e))
    else:
        h = self.act_fn(_linear(self, x, "up_proj", e))
    y = _linear(self, h, "down_proj", e)
    return self.post_expert_norm(y) if self.has_post_expert_norm else y


def _dense_routing(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n_experts: int, dtype) -> torch.Tensor:
    """[T, E] with top_k_weights at the chosen experts and 0 elsewhere. Indices >= n_experts (expert-parallel
    sentinels, which carry weight 0) land in a dropped extra column."""
    t = top_k_index.shape[0]
    dense = torch.zeros(t, n_experts + 1, dtype=dtype, device=top_k_weights.device)
    dense = dense.scatter_add(1, top_k_index.clamp(max=n_experts), top_k_weights.to(dtype))
    return dense[:, :n_experts]


def sparse_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        tok, pos = torch.where(top_k_index == e)  # token rows and their top-k slot (possibly none)
        y = _expert_mlp(self, hidden_states[tok], e) * top_k_weights[tok, pos, None]
        out = out.index_add(0, tok, y.to(out.dtype))
    return out


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    n_tok, hidden = hidden_states.shape
    x = hidden_states.unsqueeze(0).expand(self.num_experts, n_tok, hidden)
    y = _expert_mlp(self, x)  # [E, T, H]
    w = _dense_routing(top_k_index, top_k_weights, self.num_experts, y.dtype)  # [T, E]
    return (y * w.transpose(0, 1)[..., None]).sum(0).to(hidden_states.dtype)


def register() -> None:
    """Make "compressor_sparse" / "compressor_dense" valid experts implementations (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(SPARSE, sparse_experts_forward)
    ExpertsInterface.register(DENSE, dense_experts_forward)


register()


# --- unfused experts (compressor.moe.LinearExperts) -------------------------------------------------------


def _linear_sparse_forward(self: LinearExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """LinearExperts.forward without the data-dependent `numel() == 0` skip (an empty expert adds nothing)."""
    out = torch.zeros_like(hidden_states)
    for e, expert in enumerate(self):
        tok, pos = torch.where(top_k_index == e)
        y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
        out = out.index_add(0, tok, y.to(out.dtype))
    return out


def _linear_dense_forward(self: LinearExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    y = torch.stack([expert(hidden_states) for expert in self])  # [E, T, H]
    w = _dense_routing(top_k_index, top_k_weights, len(self), y.dtype)
    return (y * w.transpose(0, 1)[..., None]).sum(0).to(hidden_states.dtype)


_LINEAR_FORWARDS = {"sparse": _linear_sparse_forward, "dense": _linear_dense_forward}


# --- the switch ------------------------------------------------------------------------------------------


def _dispatches(mod: nn.Module) -> bool:
    """Whether a fused experts module's forward goes through ExpertsInterface (`@use_experts_implementation`)."""
    return hasattr(mod, "has_gate") and hasattr(mod, "is_transposed") and hasattr(mod, "config")


@contextmanager
def export_experts(model: nn.Module, mode: Literal["sparse", "dense"]):
    """Run every MoE experts module of `model` in the export-friendly `mode` inside the block; restore after.

    Fused experts: the configs they dispatch on get `_experts_implementation` = "compressor_<mode>".
    Unfused `LinearExperts`: the instance's forward is replaced. A model without experts is left as it is."""
    if mode not in _IMPL:
        raise ValueError(f"mode must be 'sparse' or 'dense', not {mode!r}")
    configs, swapped = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, LinearExperts):
            swapped.append(mod)
        elif _is_fused(mod):
            if not _dispatches(mod):
                raise ValueError(f"{name}: fused experts of {type(mod).__name__} do not dispatch through "
                                 "transformers' ExpertsInterface; cannot choose an export form")
            configs[id(mod.config)] = mod.config
    saved = [(cfg, cfg._experts_implementation_internal) for cfg in configs.values()]
    try:
        for cfg, _ in saved:
            # The internal attribute: the public setter would also rewrite every sub-config.
            cfg._experts_implementation_internal = _IMPL[mode]
        for mod in swapped:
            mod.forward = _LINEAR_FORWARDS[mode].__get__(mod)
        model._compressor_experts_mode = mode  # an exporter inside the block keeps this choice
        yield model
    finally:
        model.__dict__.pop("_compressor_experts_mode", None)
        for cfg, impl in saved:
            cfg._experts_implementation_internal = impl
        for mod in swapped:
            mod.__dict__.pop("forward", None)
