"""expert_trim on tiny MoE models built here (Mixtral, Qwen2-MoE with a shared expert, DeepSeek-V3): an expert
the router never selects is removed without changing the outputs, the router stays normalised, the trimmed
checkpoint reloads with fewer experts, and bad input fails in one line with nothing written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from compressor.context import RunContext
from compressor.errors import PassError
from compressor.model import load_model
from compressor.recipe import ModelSpec
from compressor.registry import get_pass
from compressor.targets import get_target
from conftest import _train_tokenizer, build_tiny_mixtral, run_cli

CHANNEL = 0  # the residual channel held constant to make experts unreachable


def _save(model, tok, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def build_tiny_qwen_moe(folder: Path, experts: int = 8, norm_topk_prob: bool = False, seed: int = 0) -> Path:
    """A tiny random Qwen2-MoE (hidden 32, 2 layers, a gated shared expert), with the trained tokenizer."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(folder)
    cfg = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=experts, num_experts_per_tok=2,
                         norm_topk_prob=norm_topk_prob, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return _save(Qwen2MoeForCausalLM(cfg), tok, folder)


def build_tiny_deepseek(folder: Path, seed: int = 0) -> Path:
    """A tiny random DeepSeek-V3 (MLA attention, sigmoid router with one group, one shared expert)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(folder)
    cfg = DeepseekV3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                           n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                           first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=256, bos_token_id=1,
                           eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return _save(DeepseekV3ForCausalLM(cfg), tok, folder)


def make_unreachable(model, expert_of_layer: dict[int, int]) -> None:
    """Hold residual channel CHANNEL at 0.1 (embeddings) with nothing writing to it, so every router input has a
    positive constant there; a router row of -1000 on that channel puts its expert below all others, always."""
    inner = model.model
    with torch.no_grad():
        inner.embed_tokens.weight[:, CHANNEL] = 0.1  # the scale of the other channels
        for i, layer in enumerate(inner.layers):
            layer.self_attn.o_proj.weight[CHANNEL] = 0
            mlp = layer.mlp
            mlp.experts.down_proj[:, CHANNEL] = 0
            for shared in ("shared_expert", "shared_experts"):
                if hasattr(mlp, shared):
                    getattr(mlp, shared).down_proj.weight[CHANNEL] = 0
            mlp.gate.weight[:, CHANNEL] = 0  # the constant channel must not steer the other experts
            if i in expert_of_layer:
                e = expert_of_layer[i]
                mlp.gate.weight[e] = 0
                mlp.gate.weight[e, CHANNEL] = -1000.0


def ctx_for(tmp_path: Path, batches: torch.Tensor | None) -> RunContext:
    return RunContext(get_target("cpu"), tmp_path / "work", tmp_path / "cache", quiet=True,
                      logger=logging.getLogger("compressor"),
                      calibration=(lambda: batches) if batches is not None else None)


def run_pass(name: str, handle, ctx, **cfg):
    info = get_pass(name)
    return info.run(handle, info.config(**cfg), ctx)


def tokens(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("models") / "mixtral8", experts=8)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen_moe(tmp_path_factory.mktemp("models") / "qwen8")


def _load(folder):
    return load_model(ModelSpec(source=str(folder)))


@pytest.mark.parametrize("criterion", ["frequency", "router_mass", "reap"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen"])
def test_removing_experts_the_router_never_selects_leaves_outputs_unchanged(arch, criterion, mixtral_dir,
                                                                            qwen_dir, tmp_path):
    h = _load(mixtral_dir if arch == "mixtral" else qwen_dir)
    make_unreachable(h.model, {0: 5, 1: 2})
    x = tokens(2, 24, seed=1)
    before = h.model(input_ids=x).logits
    res = run_pass("expert_trim", h, ctx_for(tmp_path, tokens(6, 32, seed=0)), criterion=criterion, num_experts=7)
    assert [r["expert"] for r in res.info["removed"]["model.layers.0.mlp"]] == [5]
    assert [r["expert"] for r in res.info["removed"]["model.layers.1.mlp"]] == [2]
    assert res.info["removed"]["model.layers.0.mlp"][0]["reason"] == "calibration never routed a token to it"
    assert res.info["unreached_experts"] == {"model.layers.0.mlp": [5], "model.layers.1.mlp": [2]}
    assert res.info["coverage"]["model.layers.0.mlp"]["tokens"] == 1.0
    assert res.info["mean_block_error"] < 1e-5 and res.info["predicted_risk"] == "low"
    after = h.model(input_ids=x).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=0), (after - before).abs().max()
    # Not vacuous: removing an expert that is used does change the outputs.
    h2 = _load(mixtral_dir if arch == "mixtral" else qwen_dir)
    make_unreachable(h2.model, {})
    run_pass("expert_trim", h2, ctx_for(tmp_path, None), criterion="random", num_experts=7)
    assert (h2.model(input_ids=x).logits - before).abs().max() > 1e-3


def test_mixtral_router_stays_normalised(mixtral_dir, tmp_path):
    h = _load(mixtral_dir)
    res = run_pass("expert_trim", h, ctx_for(tmp_path, tokens(6, 32, seed=0)), criterion="reap", remove_fraction=0.5)
    assert res.info["experts_after"] == 4 and h.model.config.num_local_experts == 4
    hidden = torch.randn(50, 32)
    for layer in h.model.model.layers:
        logits, weights, idx = layer.mlp.gate(hidden)
        assert logits.shape == (50, 4) and idx.max() < 4
        assert torch.allclose(weights.sum(-1), torch.ones(50), atol=1e-6)
        assert torch.allclose(torch.softmax(logits, -1).sum(-1), torch.ones(50), atol=1e-6)


def test_unrenormalised_router_spreads_the_removed_mass_over_the_kept_experts(qwen_dir, tmp_path):
    """Qwen2-MoE without norm_topk_prob: a kept expert's weight becomes p / (1 - removed probability)."""
    h = _load(qwen_dir)
    gate = h.model.model.layers[0].mlp.gate
    hidden = torch.randn(40, 32)
    p_old = torch.softmax(gate(hidden)[0].float(), -1)
    res = run_pass("expert_trim", h, ctx_for(tmp_path, tokens(6, 32, seed=0)), criterion="frequency", num_experts=6)
    keep = res.info["kept"]["model.layers.0.mlp"]
    assert len(keep) == 6 and h.model.config.num_experts == 6
    _, w_new, idx_new = h.model.model.layers[0].mlp.gate(hidden)
    expected = p_old[:, keep] / p_old[:, keep].sum(-1, keepdim=True)
    assert torch.allclose(w_new, expected.gather(1, idx_new), atol=1e-6)
    assert (w_new.sum(-1) < 1).all()  # top-2 weights are not renormalised by this architecture


def test_shared_expert_is_kept_and_checkpoint_reloads(qwen_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    h = _load(qwen_dir)
    shared = {k: v.clone() for k, v in h.model.model.layers[1].mlp.shared_expert.state_dict().items()}
    run_pass("expert_trim", h, ctx_for(tmp_path, tokens(6, 32, seed=0)), criterion="reap", num_experts=5)
    for k, v in h.model.model.layers[1].mlp.shared_expert.state_dict().items():
        assert torch.equal(v, shared[k])
    h.model.save_pretrained(tmp_path / "trimmed")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "trimmed")
    assert m.config.num_experts == 5
    assert m.model.layers[0].mlp.experts.gate_up_proj.shape == (5, 64, 32)
    assert m.model.layers[0].mlp.gate.weight.shape == (5, 32)
    x = tokens(1, 16, seed=3)
    assert torch.allclose(m(input_ids=x).logits, h.model(input_ids=x).logits, atol=1e-6)


def test_deepseek_trim_slices_the_correction_bias_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    h = _load(build_tiny_deepseek(tmp_path / "ds"))
    with torch.no_grad():
        h.model.model.layers[0].mlp.gate.e_score_correction_bias.copy_(torch.arange(8.0) / 100)
    res = run_pass("expert_trim", h, ctx_for(tmp_path, tokens(6, 32, seed=0)), criterion="reap", num_experts=6)
    keep = res.info["kept"]["model.layers.0.mlp"]
    assert h.model.config.n_routed_experts == 6
    assert torch.allclose(h.model.model.layers[0].mlp.gate.e_score_correction_bias, torch.tensor(keep) / 100)
    h.model.save_pretrained(tmp_path / "trimmed")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "trimmed")
    assert m.model.layers[0].mlp.experts.down_proj.shape[0] == 6
    x = tokens(1, 16, seed=3)
    assert torch.allclose(m(input_ids=x).logits, h.model(input_ids=x).logits, atol=1e-6)


def test_coverage_target_keeps_one_count_for_all_layers(mixtral_dir, tmp_path):
    h = _load(mixtral_dir)
    make_unreachable(h.model, {0: 5, 1: 2})
    res = run_pass("expert_trim", h, ctx_for(tmp_path, tokens(6, 32, seed=0)), criterion="router_mass",
                   coverage=0.999999)
    # Every layer needs its 7 reachable experts for all but ~0 of the mass.
    assert res.info["experts_after"] == 7
    assert "one expert count per config" in res.info["notes"][0]
    assert min(c["router_mass"] for c in res.info["coverage"].values()) >= 0.9999


def test_trim_through_the_pipeline_reloads_with_fewer_experts(mixtral_dir, quant_recipe, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    recipe = quant_recipe("  - {pass: expert_stats}\n  - {pass: expert_trim, criterion: reap, num_experts: 6}",
                          model=mixtral_dir)
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    stats, trim = report["passes"][0]["info"], report["passes"][1]["info"]
    assert len(stats["heatmap"]["token_share"]) == 2 and len(stats["heatmap"]["token_share"][0]) == 8
    tokens_ = stats["calibration_tokens"]
    assert tokens_ == 8 * 64
    assert trim["experts_after"] == 6 and trim["parameters_after"] < trim["parameters_before"]
    assert all(len(v) == 2 for v in trim["removed"].values())
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint")
    assert m.config.num_local_experts == 6
    assert m.model.layers[1].mlp.experts.gate_up_proj.shape == (6, 128, 32)
    assert m.model.layers[1].mlp.experts.down_proj.shape == (6, 32, 64)
    assert m.model.layers[1].mlp.gate.weight.shape == (6, 32)
    r = report["result"]["metrics"]
    assert r["model_bytes"] < report["baseline"]["metrics"]["model_bytes"]


def test_expert_stats_counts_every_routed_slot_and_are_cached(mixtral_dir, tmp_path):
    from compressor.passes.moe._arch import arch_of, moe_blocks
    from compressor.passes.moe._stats import cached_collect

    h = _load(mixtral_dir)
    batches = tokens(4, 32, seed=0)
    ctx = ctx_for(tmp_path, batches)
    arch = arch_of(h.model)
    blocks = moe_blocks(h.model, arch)
    stats, reused = cached_collect(h, arch, blocks, batches, ctx)
    assert not reused
    for st in stats.values():
        assert st.tokens == 4 * 32
        assert float(st["counts"].sum()) == 4 * 32 * 2  # top-2: two slots per token
        assert float(st["prob_mass"].sum()) == pytest.approx(4 * 32, rel=1e-6)
        assert float(st["gate_mass"].sum()) == pytest.approx(4 * 32, rel=1e-6)  # renormalised top-2
        assert torch.equal(torch.diagonal(st["coact"]), st["counts"])
        assert (st["reap_sum"] > 0).all()
    again, reused = cached_collect(h, arch, blocks, batches, ctx)
    assert reused
    for n in stats:
        assert torch.equal(again[n]["gram"], stats[n]["gram"])


def test_plan_estimate_shrinks_expert_tensors_and_router_rows():
    from compressor.passes.moe._common import estimate_tensors
    from compressor.passes.moe.expert_trim import ExpertTrimConfig

    fused = [("model.layers.0.mlp.gate.weight", (8, 32), 8 * 32 * 4),
             ("model.layers.0.mlp.experts.gate_up_proj", (8, 128, 32), 8 * 128 * 32 * 4),
             ("model.layers.0.mlp.experts.down_proj", (8, 32, 64), 8 * 32 * 64 * 4),
             ("model.layers.0.mlp.shared_expert.up_proj.weight", (64, 32), 64 * 32 * 4),
             ("model.embed_tokens.weight", (320, 32), 320 * 32 * 4)]
    out = dict((n, (s, b)) for n, s, b in estimate_tensors(ExpertTrimConfig(remove_fraction=0.25), fused))
    assert out["model.layers.0.mlp.gate.weight"] == ((6, 32), 6 * 32 * 4)
    assert out["model.layers.0.mlp.experts.gate_up_proj"] == ((6, 128, 32), 6 * 128 * 32 * 4)
    assert out["model.layers.0.mlp.experts.down_proj"][0] == (6, 32, 64)
    assert out["model.layers.0.mlp.shared_expert.up_proj.weight"][0] == (64, 32)  # shared experts stay
    assert out["model.embed_tokens.weight"][0] == (320, 32)
    per_expert = [("model.layers.0.block_sparse_moe.gate.weight", (8, 32), 1024)] + [
        (f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight", (64, 32), 8192) for e in range(8)]
    out = estimate_tensors(ExpertTrimConfig(num_experts=5), per_expert)
    assert len(out) == 1 + 5 and out[0][1] == (5, 32)
    assert estimate_tensors(ExpertTrimConfig(coverage=0.9), per_expert) == per_expert  # decided at run time


# --- bad input ----------------------------------------------------------------------------------------------


def _fails(recipe, tmp_path, capsys, rc_expected=2) -> str:
    out = tmp_path / "out"
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", out, "--quiet"], capsys)
    assert rc == rc_expected, err
    assert not out.exists()
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("passes, message", [
    ("{pass: expert_trim, num_experts: 9}", "num_experts 9 is more than the 8 experts per layer of this mixtral"),
    ("{pass: expert_trim, num_experts: 1}", "num_experts 1 is below the 2 experts every token routes to"),
    ("{pass: expert_trim, remove_fraction: 0.9}", "remove_fraction 0.9 (keeps 1 of 8) is below the 2 experts"),
    ("{pass: expert_merge, num_experts: 12}", "num_experts 12 is more than the 8 experts"),
])
def test_bad_counts(passes, message, mixtral_dir, quant_recipe, tmp_path, capsys):
    line = _fails(quant_recipe(f"  - {passes}", model=mixtral_dir), tmp_path, capsys)
    assert message in line


def test_not_a_moe_model(tiny_model_dir, quant_recipe, tmp_path, capsys):
    line = _fails(quant_recipe("  - {pass: expert_trim, num_experts: 2}"), tmp_path, capsys)
    assert "LlamaForCausalLM (model_type llama) is not a mixture-of-experts model" in line
    assert "mixtral, qwen2_moe" in line


def test_unsupported_moe_architecture(quant_recipe, tmp_path, capsys):
    from transformers import PhimoeConfig, PhimoeForCausalLM

    d = tmp_path / "phimoe"
    d.mkdir()
    tok = _train_tokenizer(d)
    cfg = PhimoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    _save(PhimoeForCausalLM(cfg), tok, d)
    line = _fails(quant_recipe("  - {pass: expert_trim, num_experts: 2}", model=d), tmp_path, capsys)
    assert "unsupported MoE architecture phimoe (PhimoeForCausalLM); supported: mixtral, qwen2_moe, qwen3_moe" in line


def test_criterion_needs_calibration(mixtral_dir, quant_recipe, tmp_path, capsys):
    line = _fails(quant_recipe("  - {pass: expert_trim, criterion: reap, num_experts: 6}", calibration=None,
                               model=mixtral_dir), tmp_path, capsys)
    assert "passes.0" in line and "expert_trim needs calibration data" in line
    # random needs none
    recipe = quant_recipe("  - {pass: expert_trim, criterion: random, num_experts: 6}", calibration=None,
                          model=mixtral_dir, name="random.yaml")
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "ok", "--quiet"], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("passes, key, message", [
    ("{pass: expert_trim}", "passes.0", "exactly one of num_experts, remove_fraction, coverage"),
    ("{pass: expert_trim, num_experts: 4, coverage: 0.9}", "passes.0", "exactly one of"),
    ("{pass: expert_trim, criterion: random, coverage: 0.9}", "passes.0", "criterion random has no ranking"),
    ("{pass: expert_trim, criterion: entropy, num_experts: 4}", "passes.0.criterion", "reap"),
    ("{pass: expert_merge, num_experts: 4, similarity: weights}", "passes.0.similarity", "output"),
])
def test_bad_config_names_the_key(passes, key, message, mixtral_dir, quant_recipe, tmp_path, capsys):
    line = _fails(quant_recipe(f"  - {passes}", model=mixtral_dir), tmp_path, capsys)
    assert key in line and message in line


def test_predicted_risk_can_stop_the_run(mixtral_dir, quant_recipe, tmp_path, capsys):
    recipe = quant_recipe("  - {pass: expert_trim, num_experts: 2, max_block_error: 0.05, on_risk: error}",
                          model=mixtral_dir)
    line = _fails(recipe, tmp_path, capsys, rc_expected=1)
    assert "predicted risk high: the MoE blocks' outputs on calibration tokens change by" in line
    assert "worst model.layers." in line and "(on_risk: error)" in line


def test_predicted_risk_grows_with_what_is_removed_and_is_measured_before_any_change(mixtral_dir, tmp_path):
    from compressor.errors import PassError

    errs = []
    for keep in (6, 4, 2):
        h = _load(mixtral_dir)
        res = run_pass("expert_trim", h, ctx_for(tmp_path, tokens(6, 32, seed=0)), criterion="reap", num_experts=keep)
        errs.append(res.info["mean_block_error"])
        assert set(res.info["coverage"]["model.layers.0.mlp"]) == {"router_mass", "tokens", "reap_mass", "block_error"}
    assert 0 < errs[0] < errs[1] < errs[2]
    h = _load(mixtral_dir)
    with pytest.raises(PassError, match="predicted risk high"):
        run_pass("expert_trim", h, ctx_for(tmp_path, tokens(6, 32, seed=0)), criterion="reap", num_experts=2,
                 max_block_error=errs[2] / 2, on_risk="error")
    assert h.model.config.num_local_experts == 8 and h.model.model.layers[0].mlp.gate.weight.shape[0] == 8


def test_runtime_errors_are_pass_errors_with_exit_code_2(mixtral_dir, tmp_path):
    h = _load(mixtral_dir)
    with pytest.raises(PassError) as e:
        run_pass("expert_trim", h, ctx_for(tmp_path, None), criterion="reap", num_experts=4)
    assert e.value.exit_code == 2 and "criterion reap needs calibration data" in str(e.value)
    assert h.model.config.num_local_experts == 8  # nothing changed
