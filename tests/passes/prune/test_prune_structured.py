"""prune_structured on tiny Llama / Qwen2 / Mistral models: exact shapes and config, units made unimportant are
the ones removed (with unchanged logits), KV-cache decoding after dropping layers, save/load roundtrip, the
pipeline's parameter count, and one-line refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from compressor.context import RunContext
from compressor.errors import PassError
from compressor.model import ModelHandle, load_model
from compressor.passes.prune.structured import StructuredConfig, run
from compressor.targets import get_target
from conftest import run_cli

VOCAB = 96


def _llama(layers=3, heads=4, kv=2, seed=0, tie=True, arch="llama"):
    import transformers as tf

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
              tie_word_embeddings=tie)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():  # larger than the default init, so that every unit carries signal
        for n, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.normal_(0, 0.15)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _tokens(n=4, length=24, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _prune(model, calibration=None, **cfg) -> dict:
    ctx = RunContext(get_target("cpu"), Path("."), Path("."), quiet=True,
                     calibration=(lambda: calibration) if calibration is not None else None)
    handle = ModelHandle(model, None, "tiny", "tiny", "f")
    return run(handle, StructuredConfig(**cfg), ctx).info


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_shapes_config_and_parameter_count_match_a_model_built_small():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _llama()
    before = sum(p.numel() for p in model.parameters())
    info = _prune(model, _tokens(), mlp_ratio=0.5, round_to=8, num_attention_heads=2, drop_layers=1)
    c = model.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) \
        == (2, 64, 2, 2, 16)
    assert info["config"] == {"num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2,
                              "num_key_value_heads": 2, "head_dim": 16}
    blk = model.model.layers[0]
    assert blk.mlp.gate_proj.weight.shape == (64, 64) and blk.mlp.up_proj.weight.shape == (64, 64)
    assert blk.mlp.down_proj.weight.shape == (64, 64) and blk.mlp.down_proj.in_features == 64
    assert blk.self_attn.q_proj.weight.shape == (32, 64) and blk.self_attn.k_proj.weight.shape == (32, 64)
    assert blk.self_attn.o_proj.weight.shape == (64, 32) and blk.self_attn.num_key_value_groups == 1
    # the same as an ordinary model built with the new config, tensor for tensor
    fresh = LlamaForCausalLM(LlamaConfig(**{**c.to_dict()}))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    after = sum(p.numel() for p in model.parameters())
    # per kept layer: MLP 3*64*64, heads: q 2 of 4 (32 rows), o 32 columns; one whole layer (36992) dropped
    assert before - after == 2 * (3 * 64 * 64 + 2 * 32 * 64) + 36992 == info["params_removed"]
    assert info["params_before"] == before and info["params_after"] == after
    assert len(info["layers_dropped"]) == 1 and sum("dropped" in v for v in info["per_layer"].values()) == 1
    for v in info["per_layer"].values():
        if "dropped" not in v:  # one query head kept in each of the 2 groups
            assert len(v["heads_kept"]) == 2 and v["kv_heads_kept"] == [0, 1]
            assert v["heads_kept"][0] in (0, 1) and v["heads_kept"][1] in (2, 3)
            assert 0.5 < v["mlp_importance_kept"] < 1


def test_channels_with_zero_activation_are_removed_and_logits_unchanged():
    model = _llama()
    x = _tokens()
    gen = torch.Generator().manual_seed(3)
    dead = [torch.randperm(128, generator=gen)[:64] for _ in model.model.layers]
    with torch.no_grad():  # silu(0) * up = 0: these channels never fire
        for blk, idx in zip(model.model.layers, dead):
            blk.mlp.gate_proj.weight[idx] = 0
    ref = _logits(model, x)
    info = _prune(model, x, mlp_ratio=0.5, round_to=64)
    assert model.config.intermediate_size == 64
    for blk, idx in zip(model.model.layers, dead):  # every kept channel is a live one
        assert (blk.mlp.gate_proj.weight.abs().sum(1) > 0).all()
    assert all(v["mlp_importance_kept"] == 1.0 for v in info["per_layer"].values())
    assert torch.allclose(_logits(model, x), ref, atol=1e-5)


def test_magnitude_removes_the_weakest_channels():
    model = _llama(layers=2)
    x = _tokens()
    weak = torch.tensor([3, 17, 40, 99])
    with torch.no_grad():  # tiny weights, zero down columns: these channels add nothing
        for blk in model.model.layers:
            blk.mlp.gate_proj.weight[weak] *= 1e-3
            blk.mlp.up_proj.weight[weak] *= 1e-3
            blk.mlp.down_proj.weight[:, weak] = 0
    ref = _logits(model, x)
    info = _prune(model, importance="magnitude", intermediate_size=124, round_to=4)
    for blk in model.model.layers:
        assert blk.mlp.gate_proj.weight.shape == (124, 64)
        assert (blk.mlp.down_proj.weight.abs().sum(0) > 0).all()
    assert all(v["mlp_importance_kept"] > 0.99 for v in info["per_layer"].values())
    assert torch.allclose(_logits(model, x), ref, atol=1e-5)


def test_query_heads_with_zero_o_columns_are_removed_by_magnitude_and_logits_unchanged():
    model = _llama()  # GQA: 4 query heads in 2 groups
    x = _tokens()
    with torch.no_grad():  # head 1 (group 0) and head 3 (group 1) write nothing to the residual
        for blk in model.model.layers:
            for h in (1, 3):
                blk.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
                blk.self_attn.q_proj.weight[h * 16:(h + 1) * 16] *= 0.01
    ref = _logits(model, x)
    info = _prune(model, importance="magnitude", num_attention_heads=2)
    assert info["calibration_tokens"] == 0
    assert all(v["heads_kept"] == [0, 2] and v["kv_heads_kept"] == [0, 1] for v in info["per_layer"].values())
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    assert torch.allclose(_logits(model, x), ref, atol=1e-5)


def test_activation_picks_the_silent_head_per_layer():
    model = _llama(heads=4, kv=4)  # multi-head attention: every head is its own group
    x = _tokens()
    silent = [2, 1, 3]
    with torch.no_grad():  # zero values: the head's attention output is exactly zero
        for blk, h in zip(model.model.layers, silent):
            blk.self_attn.v_proj.weight[h * 16:(h + 1) * 16] = 0
    ref = _logits(model, x)
    info = _prune(model, x, heads_ratio=0.25)
    for i, h in enumerate(silent):
        assert info["per_layer"][str(i)]["heads_kept"] == [j for j in range(4) if j != h]
        assert info["per_layer"][str(i)]["head_importance_kept"] == 1.0
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 3)
    assert torch.allclose(_logits(model, x), ref, atol=1e-5)


def test_whole_kv_group_removed_with_its_query_heads():
    model = _llama()
    x = _tokens()
    with torch.no_grad():  # KV group 0 (query heads 0, 1) outputs zeros
        for blk in model.model.layers:
            blk.self_attn.v_proj.weight[:16] = 0
    ref = _logits(model, x)
    info = _prune(model, x, heads_ratio=0.5, heads_unit="kv_group")
    assert all(v["kv_heads_kept"] == [1] and v["heads_kept"] == [2, 3] for v in info["per_layer"].values())
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    assert torch.allclose(_logits(model, x), ref, atol=1e-5)


def _decode_matches_recompute(model, prompt):
    """Prefill + 2 cached decode steps give the logits of a full recompute; returns the last step's logits."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        name = "cache" if "cache" in out else "past_key_values"
        seq = prompt
        for _ in range(2):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            out = model(input_ids=nxt, use_cache=True, **{name: out[name]})
            full = model(input_ids=seq, use_cache=False).logits[:, -1]
            assert torch.allclose(out.logits[:, -1], full, atol=1e-5)
    return out.logits[:, -1]


def test_identity_layer_is_dropped_renumbered_and_kv_cache_decoding_matches():
    model = _llama(layers=4)
    x = _tokens()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: Block Influence 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ref = _logits(model, x)
    ref_step = _decode_matches_recompute(model, x[:2, :10])
    info = _prune(model, x, drop_layers=1)
    assert info["layers_dropped"] == [2] and info["per_layer"]["2"]["block_influence"] < 1e-9
    assert min(v["block_influence"] for k, v in info["per_layer"].items() if k != "2") > 1e-3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3
    assert torch.allclose(_logits(model, x), ref, atol=1e-5)
    assert torch.allclose(_decode_matches_recompute(model, x[:2, :10]), ref_step, atol=1e-5)
    gen = model.generate(x[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True)
    gen_nocache = model.generate(x[:1, :6], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(gen, gen_nocache)


def test_explicit_layers_need_no_calibration():
    model = _llama(layers=4)
    info = _prune(model, importance="magnitude", layers_to_drop=[0, 3])
    assert info["layers_dropped"] == [0, 3] and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    _decode_matches_recompute(model, _tokens(2, 8))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_save_and_from_pretrained_roundtrip(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _llama(layers=3, arch=arch, tie=arch != "mistral")
    x = _tokens()
    _prune(model, x, mlp_ratio=0.25, round_to=32, num_key_value_heads=1, drop_layers=1)
    ref = _logits(model, x)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 96, 2, 1, 16)
    if arch == "qwen2":
        assert len(cfg["layer_types"]) == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(model)
    assert torch.equal(_logits(loaded, x), ref)
    if arch != "mistral":  # tied embeddings stay tied
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    _decode_matches_recompute(loaded, x[:1, :8])


# ---- refusals ----

@pytest.mark.parametrize("cfg,match", [
    ({"mlp_ratio": 1.0}, "less than 1"),
    ({"heads_ratio": -0.1}, "greater than or equal to 0"),
    ({"mlp_ratio": 0.5, "intermediate_size": 64}, "give mlp_ratio or intermediate_size"),
    ({"intermediate_size": 100}, "intermediate_size 100 is not a multiple of round_to 64"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_attention_heads 6 is not a multiple of "
                                                           "num_key_value_heads 4"),
    ({"heads_ratio": 0.5, "num_key_value_heads": 1}, "give heads_ratio or num_key_value_heads"),
    ({"drop_layers": 1, "importance": "magnitude"}, "drop_layers needs importance: activation"),
    ({"layers_to_drop": [1, 1]}, "layers_to_drop"),
    ({}, "nothing to prune"),
    ({"mlp_ratio": 0.5, "bogus": 1}, "bogus"),
])
def test_bad_config(cfg, match):
    with pytest.raises(ValidationError, match=match):
        StructuredConfig(**cfg)


@pytest.mark.parametrize("cfg,match", [
    ({"intermediate_size": 256}, "intermediate_size 256 is larger than the model's 128"),
    ({"mlp_ratio": 0.9, "round_to": 64}, "mlp_ratio 0.9 would remove all 128 intermediate channels"),
    ({"mlp_ratio": 0.2, "round_to": 64}, "mlp_ratio 0.2 removes no channel: 128 intermediate channels round to 128"),
    ({"num_attention_heads": 3}, "num_attention_heads 3 does not keep 2 equal GQA groups"),
    ({"num_attention_heads": 8}, "num_attention_heads 8 is larger than the model's 4"),
    ({"num_key_value_heads": 4}, "num_key_value_heads 4 is larger than the model's 2"),
    ({"heads_ratio": 0.9}, "heads_ratio 0.9 would remove all 2 query heads of each KV group"),
    ({"heads_ratio": 0.2}, "heads_ratio 0.2 removes no head"),
    ({"layers_to_drop": [1, 3]}, "layers_to_drop: layer 3 is out of range"),
    ({"layers_to_drop": [0, 1, 2]}, "layers_to_drop would remove all 3 decoder layers"),
    ({"drop_layers": 3}, "drop_layers would remove all 3 decoder layers"),
])
def test_bad_targets_for_the_model(cfg, match):
    model = _llama()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(PassError, match=match) as e:
        _prune(model, _tokens(), importance="activation", **{"round_to": 1, **cfg})
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # refused before touching anything


def test_unsupported_architecture_and_quantized_model_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from compressor.kernels.qlinear import QuantLinear

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(PassError, match="GPT2LMHeadModel is not supported"):
        _prune(gpt2, importance="magnitude", mlp_ratio=0.5)
    model = _llama()
    model.config.intermediate_size = 96
    with pytest.raises(PassError, match="model.layers.0.mlp.gate_proj has 128 outputs but the config implies 96"):
        _prune(model, importance="magnitude", mlp_ratio=0.5)
    model = _llama()
    lin = model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = QuantLinear.like(lin, "int8", 0, True)
    with pytest.raises(PassError, match="model.layers.1.mlp.up_proj is already quantized.*before quantization"):
        _prune(model, importance="magnitude", mlp_ratio=0.5)


# ---- through the pipeline ----

PRUNE = "  - {pass: prune_structured, mlp_ratio: 0.5, round_to: 32, num_key_value_heads: 1, drop_layers: 1}"


def test_pipeline_prunes_then_quantizes_and_the_checkpoint_reloads(quant_recipe, tmp_path, home, capsys):
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    recipe = quant_recipe(PRUNE + "\n  - {pass: quantize_rtn, format: int8}")
    reports = []
    for out in ("a", "b"):  # the second run reloads the pruned stage from the cache
        rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / out, "--quiet"], capsys)
        assert rc == 0, err
        reports.append(json.loads((tmp_path / out / "report" / "report.json").read_text()))
    info = reports[0]["passes"][0]["info"]
    # tiny_model_dir: 2 layers, hidden 64, intermediate 128, 4 heads of 16 in 2 KV groups.
    # Dropped layer: q, o 64x64, k, v 32x64, MLP 3 x 64x128, 2 norms of 64 = 36992; kept layer: MLP 128 -> 64
    # (3 x 64x64 = 12288), one KV group of two (q 32 rows, o 32 columns, k and v 16 rows: 6144).
    assert info["params_removed"] == 36992 + 12288 + 6144
    assert info["params_before"] == reports[0]["model"]["parameters"]
    assert info["params_after"] == info["params_before"] - 55424
    assert info["config"] == {"num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 2,
                              "num_key_value_heads": 1, "head_dim": 16}
    assert info["calibration_tokens"] == 8 * 64
    assert reports[1]["passes"][0]["cached"] is True
    for r in reports:
        m = r["result"]["metrics"]
        assert m["perplexity"] > r["baseline"]["metrics"]["perplexity"] and m["model_bytes"] > 0
    assert reports[0]["result"]["metrics"]["perplexity"] == reports[1]["result"]["metrics"]["perplexity"]
    h = load_model(ModelSpec(source=str(tmp_path / "a" / "checkpoint")))
    assert h.model.config.num_hidden_layers == 1 and h.model.model.layers[0].mlp.down_proj.in_features == 64


def test_pipeline_refuses_pruning_after_quantization(quant_recipe, tmp_path, home, capsys):
    recipe = quant_recipe("  - {pass: quantize_rtn, format: int8}\n" + PRUNE)
    out = tmp_path / "o"
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", out, "--quiet"], capsys)
    assert rc == 2 and not out.exists()
    # Refused by the plan, before the model is loaded (the pass itself also refuses QuantLinear layers).
    assert "prune_structured cannot run after quantize_rtn (passes.0)" in err and len(err.strip().splitlines()) == 1


def test_pipeline_bad_key_is_one_line_naming_it(quant_recipe, tmp_path, home, capsys):
    recipe = quant_recipe("  - {pass: prune_structured, intermediate_size: 100, round_to: 64}")
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "o", "--quiet"], capsys)
    assert rc == 2 and "passes.0" in err and "intermediate_size 100 is not a multiple of round_to 64" in err
    assert len(err.strip().splitlines()) == 1


def test_plan_estimate_counts_removed_channels_and_layers(tiny_model_dir):
    from compressor.checkpoint_io import state_bytes
    from compressor.passes.prune.structured import _estimate
    from compressor.plan import _safetensors_tensors
    from compressor.recipe import ModelSpec

    cfg = dict(importance="magnitude", mlp_ratio=0.5, round_to=32, layers_to_drop=[0])
    tensors = _safetensors_tensors(tiny_model_dir)
    est = _estimate(StructuredConfig(**cfg), tensors)
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    _prune(h.model, **cfg)
    assert sum(t[2] for t in est) == state_bytes(h.model) < sum(t[2] for t in tensors)
    assert {n: s for n, s, _ in est} == {k: tuple(v.shape) for k, v in h.model.state_dict().items()
                                         if k != "lm_head.weight"}
