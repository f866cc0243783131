"""kv_cache_fp8: calibrated per-layer / per-head scales, attention on FP8 keys and values, checkpoint round trip."""

from __future__ import annotations

import torch

from compressor.model import load_model
from compressor.recipe import ModelSpec
from conftest import run_report


def _post_rope_amax(model_dir, batches, per_head):
    """Reference: max |key| / |value| after RoPE, from a plain forward with a cache that records them."""
    from transformers import DynamicCache

    h = load_model(ModelSpec(source=str(model_dir)))
    amax = {}
    for row in batches:
        cache = DynamicCache(config=h.config)
        with torch.no_grad():
            h.model(input_ids=row[None], cache=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            for j, t in enumerate((layer.keys, layer.values)):
                a = t.abs().amax(dim=(0, 2, 3)) if per_head else t.abs().amax().reshape(1)
                amax[i, j] = a if (i, j) not in amax else torch.maximum(amax[i, j], a)
    return amax


def test_kv_fp8_quality_and_round_trip(quant_recipe, text_dir, tmp_path, home, capsys):
    rep = run_report(quant_recipe("  - {pass: kv_cache_fp8, per_head: true}"), tmp_path / "out", capsys,
                     target="h200")
    m = rep["result"]["metrics"]
    assert 0 < m["kl_divergence"] < 0.01  # FP8 keys/values: a visible but small change
    assert m["modeled"]["kv_cache"] == "fp8"
    back = load_model(ModelSpec(source=str(tmp_path / "out" / "checkpoint")))
    attn = back.model.model.layers[1].self_attn
    assert attn.k_scale.shape == (2,) and attn.v_scale.shape == (2,)  # per KV head
    assert back.config._attn_implementation == "compressor_kv_fp8"

    # The reloaded checkpoint computes exactly what was evaluated.
    from compressor.calibration.data import eval_windows
    from compressor.eval.metrics import perplexity

    windows = eval_windows(back.tokenizer, str(text_dir), 4, 64)
    assert abs(perplexity(back.model, windows) - m["eval_sets"]["local"]["perplexity"]) < 1e-3


def test_scales_equal_post_rope_amax(tiny_model_dir):
    from compressor.kernels import kv_quant

    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    batches = torch.randint(0, h.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    ref = _post_rope_amax(tiny_model_dir, batches, per_head=False)
    from pathlib import Path

    from compressor.context import RunContext
    from compressor.registry import get_pass
    from compressor.targets import get_target

    info = get_pass("kv_cache_fp8")
    info.run(h, info.config(), RunContext(get_target("h200"), Path("."), Path("."), quiet=True,
                                          calibration=lambda: batches))
    for i, layer in enumerate(h.model.model.layers):
        assert torch.allclose(layer.self_attn.k_scale, ref[i, 0] / 448)
        assert torch.allclose(layer.self_attn.v_scale, ref[i, 1] / 448)
    # Logits move, but only slightly, and decoding with a cache gives the same as a full forward.
    ids = batches[:1]
    with torch.no_grad():
        full = h.model(input_ids=ids).logits[0, -1]
        out = h.model(input_ids=ids[:, :-1], use_cache=True)
        step = h.model(input_ids=ids[:, -1:], cache=out.past_key_values).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4)
    assert kv_quant.ATTN_NAME == h.config._attn_implementation
