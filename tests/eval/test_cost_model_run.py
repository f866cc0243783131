"""A run's MODELED cost (cost_model.model_cost) on loaded models: the input embedding is a lookup (no FLOPs, only
the rows read), MoE models compute with their active experts and read the experts a batch hits; the same split
as `compress estimate` (cost_model.traffic)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from compressor.eval import cost_model
from compressor.targets import get_target

H200 = get_target("h200")
BW = 4.8e12 * cost_model.BW_EFF


def _llama(tie: bool):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=tie)).eval()


def test_untied_embedding_is_a_lookup():
    model = _llama(tie=False)
    params = sum(p.numel() for p in model.parameters())
    emb = 1000 * 64
    c = cost_model.model_cost(H200, model, [1, 8], 256)
    assert c["parameters"] == params and c["active_parameters"] == params - emb
    assert c["embedding"]["lookup_parameters"] == emb and c["embedding"]["bytes"] == 2 * emb
    kv = cost_model.kv_bytes_per_token(model.config)
    for p in c["points"]:
        b = p["batch"]
        # Weights in BF16 less the embedding rows not read (b of 1000), plus the KV cache at context 256.
        read = 2 * params - 2 * emb + b * 2 * 64 + b * 256 * kv
        assert p["latency_ms_decode"] == pytest.approx(read / BW * 1e3)
        # Memory holds the whole embedding all the same.
        assert p["memory_gb"] == pytest.approx((2 * params + b * 256 * kv) / 1e9)


def test_tied_embedding_is_read_whole():
    model = _llama(tie=True)
    params = sum(p.numel() for p in model.parameters())  # the tied matrix once
    c = cost_model.model_cost(H200, model, [1], 256)
    assert c["active_parameters"] == params and c["embedding"]["lookup_parameters"] == 0
    read = 2 * params + 256 * cost_model.kv_bytes_per_token(model.config)
    assert c["points"][0]["latency_ms_decode"] == pytest.approx(read / BW * 1e3)


def test_moe_active_experts_match_the_estimate():
    from compressor.moe import unfuse_experts

    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    total = sum(p.numel() for p in model.parameters())
    expert = 2 * 8 * 3 * 64 * 128  # layers x experts x (gate, up, down)
    emb = 256 * 64
    c = cost_model.model_cost(H200, model, [1, 4], 128)
    assert c["moe"]["experts"] == 8 and c["moe"]["expert_params"] == expert
    assert c["active_parameters"] == total - emb - expert + expert * 2 / 8
    # `compress estimate` on the same config (bf16) computes with the same active parameters.
    est = cost_model.estimate(cfg, H200, "bf16", [1, 4])
    assert est["active_parameters"] == c["active_parameters"]
    kv = cost_model.kv_bytes_per_token(cfg)
    for p, b in zip(c["points"], (1, 4)):
        hit = 1 - (1 - 2 / 8) ** b  # experts a batch of b tokens hits under uniform routing
        read = 2 * (total - expert - emb) + 2 * expert * hit + b * 2 * 64 + b * 128 * kv
        assert p["latency_ms_decode"] == pytest.approx(read / BW * 1e3)
    assert c["moe"]["experts_read"] == pytest.approx([0.25, 1 - 0.75 ** 4])
    # Split into per-expert Linear layers (as the quantization passes do), the model costs the same.
    unfuse_experts(model)
    again = cost_model.model_cost(H200, model, [1, 4], 128)
    assert again["active_parameters"] == c["active_parameters"]
    assert [p["latency_ms_decode"] for p in again["points"]] == pytest.approx(
        [p["latency_ms_decode"] for p in c["points"]])
