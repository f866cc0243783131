"""Torch reference for the `MoE` TensorRT plugin (kernels/plugins/moe_plugin.h): the oracle the CUDA kernels
are checked against, and the exact tensor layout the ONNX node carries.

    probs = softmax(router_logits.float())                (T, E)
    w, idx = topk(probs, top_k); w /= w.sum() if normalize (T, k)   Mixtral: normalize; Qwen-MoE: norm_topk_prob
    out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = idx[t, j]

Expert weights, stacked over experts (E), in the nn.Linear orientation [out, in]:
  w_gate_up  [E, 2I, H]   rows [0, I) are gate_proj, rows [I, 2I) up_proj (transformers' fused order)
  w_down     [E, H, I]
Formats (`weight_format`):
  bf16  any float dtype; no scales
  fp8   float8_e4m3fn (or its raw bytes as uint8/int8) [E, out, in]; scales float32 [E, out, 1]
  int4  uint8 (or int8) [E, out, in // 2], two codes per byte, low nibble = even column, code = q + 8;
        scales float32 [E, out, G] (G = in // group_size; 1 = per-channel); w = (code - 8) * scale
The same layout as `QuantLinear` (kernels/python/qlinear.py) per expert, so `stack_linear_experts` only stacks.
Dequantization is float32 `value * scale`, which is what the CUDA kernel does in its shared-memory loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_FORMATS = ("bf16", "fp8", "int4")


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) logits -> float32 routing weights (T, k) and int64 expert ids (T, k), as the routing kernel."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # (T, E)
    w, idx = torch.topk(probs, top_k, dim=-1)  # (T, k) each
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def dequant_fp8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., out, in] e4m3 (or its bytes) with [..., out, 1] float scales -> float32 [..., out, in]."""
    if codes.dtype in (torch.uint8, torch.int8):
        codes = codes.view(torch.float8_e4m3fn)
    return codes.to(torch.float32) * scales.to(torch.float32)


def dequant_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., out, in // 2] packed codes with [..., out, G] float scales -> float32 [..., out, in].

    Group g covers columns [g * in / G, (g + 1) * in / G)."""
    p = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    low, high = torch.bitwise_and(p, 15), torch.bitwise_right_shift(p, 4)
    codes = torch.stack((low, high), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)  # (..., out, in)
    q = codes.to(torch.float32) - 8.0
    groups = scales.shape[-1]
    q = q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups)  # (..., out, G, g)
    return (q * scales.to(torch.float32).unsqueeze(-1)).reshape(codes.shape)


def dequant_weights(w: torch.Tensor, scales: torch.Tensor | None, weight_format: str) -> torch.Tensor:
    """Stacked expert weights in `weight_format` -> float [E, out, in] (bf16 weights are returned as is)."""
    if weight_format == "bf16":
        return w
    if scales is None:
        raise ValueError(f"weight_format {weight_format!r} needs scales")
    if weight_format == "fp8":
        return dequant_fp8(w, scales)
    if weight_format == "int4":
        return dequant_int4(w, scales)
    raise ValueError(f"unknown weight_format {weight_format!r}; expected one of {WEIGHT_FORMATS}")


def moe_reference(hidden: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  top_k: int, normalize: bool = True, weight_format: str = "bf16",
                  s_gate_up: torch.Tensor | None = None, s_down: torch.Tensor | None = None,
                  compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The MoE block output (T, H) in hidden's dtype; the math runs in `compute_dtype` (default hidden's dtype).

    hidden (T, H); router_logits (T, E); weights and scales as in the module docstring."""
    cdt = compute_dtype or hidden.dtype
    gu = dequant_weights(w_gate_up, s_gate_up, weight_format).to(cdt)  # (E, 2I, H)
    down = dequant_weights(w_down, s_down, weight_format).to(cdt)  # (E, H, I)
    n_exp, inter = gu.shape[0], gu.shape[1] // 2
    if router_logits.shape != (hidden.shape[0], n_exp):
        raise ValueError(f"router_logits {tuple(router_logits.shape)} != (tokens, experts) "
                         f"{(hidden.shape[0], n_exp)}")
    w, idx = route(router_logits, top_k, normalize)  # (T, k)
    x = hidden.to(cdt)
    out = torch.zeros_like(x)
    for e in range(n_exp):  # expert order, like transformers' eager experts
        tok, pos = torch.where(idx == e)  # token rows and their top-k slot
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], gu[e]).split(inter, dim=-1)  # (n, I) each
        y = F.linear(F.silu(gate) * up, down[e])  # (n, H)
        out.index_add_(0, tok, (y * w[tok, pos, None]).to(cdt))
    return out.to(hidden.dtype)


def _format_of(lin) -> str:
    fmt = getattr(lin, "fmt", None)
    if fmt is None:
        return "bf16"
    if fmt == "int4" and lin.symmetric and lin.group_size >= 0:  # per-group, or per-channel (one group)
        return "int4"
    if fmt == "fp8" and lin.group_size == 0 and not lin.block_size:
        return "fp8"
    raise ValueError(f"the MoE plugin takes bf16, fp8 per-channel or int4 symmetric per-group experts, not {lin!r}")


def stack_linear_experts(experts) -> dict:
    """`compressor.moe.LinearExperts` (nn.Linear or QuantLinear projections, all alike) -> the plugin's
    weight inputs: {weight_format, w_gate_up, w_down, s_gate_up, s_down} (scales None for bf16).

    The int4 group size is not a field: it is in / scales.shape[-1], per matrix."""
    fmts = {_format_of(getattr(m, p)) for m in experts for p in ("gate_proj", "up_proj", "down_proj")}
    if len(fmts) != 1:
        raise ValueError(f"all expert projections must share one format, got {sorted(fmts)}")
    (fmt,) = fmts
    key = "weight" if fmt == "bf16" else "weight_packed"

    def stack(proj_names, attr):
        return torch.stack([torch.cat([getattr(getattr(m, p), attr) for p in proj_names]) for m in experts])

    out = {"weight_format": fmt, "w_gate_up": stack(("gate_proj", "up_proj"), key).detach(),
           "w_down": stack(("down_proj",), key).detach(), "s_gate_up": None, "s_down": None}
    if fmt != "bf16":
        out["s_gate_up"] = stack(("gate_proj", "up_proj"), "weight_scale")
        out["s_down"] = stack(("down_proj",), "weight_scale")
    return out
