"""Calibration statistics: exact per-channel max, reuse from the content-hash cache, NaN stops with the layer."""

from __future__ import annotations

import logging

import pytest
import torch

from compressor.calibration.stats import NonFiniteActivation, input_channel_absmax, state_hash
from compressor.model import load_model
from compressor.recipe import ModelSpec


def _batches(vocab, n=3, length=16):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_channel_absmax_is_the_max_over_every_token(tiny_model_dir, tmp_path):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    b = _batches(h.config.vocab_size)
    name = "model.layers.1.mlp.down_proj"
    seen = []
    hook = h.model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    stats = input_channel_absmax(h.model, b, [name], None)
    hook.remove()
    direct = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).abs().amax(0)
    assert stats[name].shape == (128,) and torch.equal(stats[name], direct)


def test_channel_absmax_is_reused_from_cache_and_keyed_by_content(tiny_model_dir, tmp_path, caplog):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    b = _batches(h.config.vocab_size)
    names = ["model.layers.0.self_attn.q_proj"]
    first = input_channel_absmax(h.model, b, names, tmp_path)
    with caplog.at_level(logging.INFO, logger="t"):
        again = input_channel_absmax(h.model, b, names, tmp_path, logger=logging.getLogger("t"))
    assert "reused from the cache" in caplog.text and torch.equal(first[names[0]], again[names[0]])
    # Other tokens or other weights: a different key, so fresh statistics.
    other = input_channel_absmax(h.model, _batches(h.config.vocab_size, n=2), names, tmp_path)
    assert not torch.equal(other[names[0]], first[names[0]])
    before = state_hash(h.model)
    with torch.no_grad():
        h.model.model.layers[0].input_layernorm.weight.mul_(2)
    assert state_hash(h.model) != before
    doubled = input_channel_absmax(h.model, b, names, tmp_path)
    assert torch.allclose(doubled[names[0]], 2 * first[names[0]], rtol=1e-5)


def test_nan_activation_names_the_layer(tiny_model_dir):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    with torch.no_grad():
        h.model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(NonFiniteActivation, match="model.layers.1.mlp.gate_proj"):
        input_channel_absmax(h.model, _batches(h.config.vocab_size), ["model.layers.0.mlp.gate_proj",
                                                                      "model.layers.1.mlp.gate_proj"], None)
