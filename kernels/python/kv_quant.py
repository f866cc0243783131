"""FP8 (E4M3) KV cache: attention that reads keys and values quantized with calibrated static scales.

The scales live on each attention module as buffers `k_scale` and `v_scale` (shape (1,) per layer, or
(kv_heads,) per head), the names vLLM and TensorRT-LLM checkpoints use. Keys are quantized after RoPE, as a
serving engine stores them. The attention implementation is registered with transformers under
`compressor_kv_fp8`; it fake-quantizes key/value (quantize-dequantize with the static scale: idempotent, so
cached entries re-read each step equal what an FP8 cache would hold) and then runs the model's original
attention implementation.
"""

from __future__ import annotations

import torch

from compressor.kernels.fakequant import FP8_MAX, fake_quant

ATTN_NAME = "compressor_kv_fp8"


def _scale(s: torch.Tensor) -> torch.Tensor:
    return s.reshape(1, -1, 1, 1) if s.numel() > 1 else s.reshape(())


def kv_fp8_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    observe = getattr(module, "_kv_observe", None)
    if observe is not None:
        observe(key, value)
    elif getattr(module, "k_scale", None) is not None:
        key = fake_quant(key, "fp8", _scale(module.k_scale))
        value = fake_quant(value, "fp8", _scale(module.v_scale))
    base = getattr(module.config, "compressor_kv_cache", {}).get("base_attention", "sdpa")
    if base == "eager":
        import importlib

        mod = importlib.import_module(type(module).__module__)
        return mod.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    fn = ALL_ATTENTION_FUNCTIONS.get(base, sdpa_attention_forward) if base != ATTN_NAME else sdpa_attention_forward
    return fn(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, kv_fp8_attention)


def attention_modules(model) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")]


def install(model, per_head: bool) -> list[tuple[str, torch.nn.Module]]:
    """Give each attention module k_scale/v_scale buffers (ones) and route attention through the FP8 KV
    implementation. Records the scheme in model.config.compressor_kv_cache."""
    register()
    cfg = model.config
    base = cfg._attn_implementation if cfg._attn_implementation != ATTN_NAME else \
        cfg.compressor_kv_cache.get("base_attention", "sdpa")
    mods = attention_modules(model)
    if not mods:
        raise TypeError(f"{type(model).__name__}: no attention modules with k_proj/v_proj/layer_idx found")
    for _, m in mods:
        kv_heads = getattr(m.config, "num_key_value_heads", None) or m.config.num_attention_heads
        n = kv_heads if per_head else 1
        for b in ("k_scale", "v_scale"):
            if b in m._buffers:
                del m._buffers[b]
            m.register_buffer(b, torch.ones(n, dtype=torch.float32))
    cfg.compressor_kv_cache = {"format": "fp8", "per_head": per_head, "base_attention": base}
    cfg._attn_implementation = ATTN_NAME
    return mods


def amax(x: torch.Tensor, per_head: bool) -> torch.Tensor:
    """x (batch, kv_heads, seq, head_dim) -> max |x| per head (kv_heads,) or overall (1,)."""
    a = x.detach().abs().to(torch.float32)
    return a.amax(dim=(0, 2, 3)) if per_head else a.amax().reshape(1)


def scales_from_amax(a: torch.Tensor) -> torch.Tensor:
    return a.clamp_min(1e-8) / FP8_MAX
