"""expert_merge on tiny MoE models: groups by output similarity, aligned frequency-weighted averages, the router
keeps one row per group, the merged checkpoint reloads with fewer experts, and quantized experts are refused."""

from __future__ import annotations

import torch
from compressor.passes.moe._arch import expert_forward
from conftest import build_tiny_mixtral, run_cli
from test_expert_trim import _load, build_tiny_qwen_moe, ctx_for, make_unreachable, run_pass, tokens


def _permuted_copy(model, layer: int, src: int, dst: int, seed: int = 0) -> torch.Tensor:
    """Make expert dst of a layer a neuron-permuted copy of expert src (the same function); -> the permutation."""
    ex = model.model.layers[layer].mlp.experts
    inter = ex.down_proj.shape[-1]
    p = torch.randperm(inter, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        gu = ex.gate_up_proj.data
        gu[dst, :inter] = gu[src, :inter][p]
        gu[dst, inter:] = gu[src, inter:][p]
        ex.down_proj.data[dst] = ex.down_proj.data[src][:, p]
    return p


def _merge_copy(tmp_path, align: bool):
    """Layer 0: expert 6 is a neuron-permuted copy of expert 1 that the router never selects, so it is the one
    merged away, into the expert whose outputs it matches (cosine 1). -> (expert 1 before, expert 1 after) on x."""
    h = _load(build_tiny_mixtral(tmp_path / "m", experts=8))
    make_unreachable(h.model, {0: 6})
    _permuted_copy(h.model, 0, src=1, dst=6)
    x = torch.randn(20, 32)
    before = expert_forward(h.model.model.layers[0].mlp.experts, 1, x)
    res = run_pass("expert_merge", h, ctx_for(tmp_path, tokens(8, 32, seed=0)), criterion="frequency",
                   num_experts=7, similarity="output", weighting="uniform", align=align)
    groups = res.info["groups"]["model.layers.0.mlp"]
    assert groups["1"] == [1, 6] and all(len(g) == 1 for c, g in groups.items() if c != "1")
    assert h.model.config.num_local_experts == 7
    return before, expert_forward(h.model.model.layers[0].mlp.experts, 1, x)


def test_a_permuted_copy_is_grouped_with_its_original_and_merged_back_exactly(tmp_path):
    before, after = _merge_copy(tmp_path, align=True)
    assert torch.allclose(after, before, atol=1e-5)


def test_without_alignment_the_average_is_blurred(tmp_path):
    before, after = _merge_copy(tmp_path, align=False)
    assert (after - before).norm() / before.norm() > 0.3


def test_merged_qwen_checkpoint_reloads_with_fewer_experts_and_the_shared_expert(quant_recipe, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    d = build_tiny_qwen_moe(tmp_path / "qwen")
    recipe = quant_recipe("  - {pass: expert_merge, remove_fraction: 0.25, similarity: coactivation, "
                          "router: mean}", model=d)
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint")
    base = AutoModelForCausalLM.from_pretrained(d)
    assert m.config.num_experts == 6
    assert m.model.layers[0].mlp.experts.gate_up_proj.shape == (6, 64, 32)
    assert m.model.layers[0].mlp.gate.weight.shape == (6, 32)
    assert torch.equal(m.model.layers[0].mlp.shared_expert.up_proj.weight,
                       base.model.layers[0].mlp.shared_expert.up_proj.weight)
    x = tokens(1, 12, seed=5)
    out = m(input_ids=x).logits
    assert torch.isfinite(out).all() and (out - base(input_ids=x).logits).abs().max() > 1e-4


def test_router_mean_merges_the_rows_of_a_group(tmp_path):
    h = _load(build_tiny_mixtral(tmp_path / "m", experts=8))
    rows = h.model.model.layers[1].mlp.gate.weight.data.clone()
    res = run_pass("expert_merge", h, ctx_for(tmp_path, tokens(8, 32, seed=0)), num_experts=4, router="mean",
                   weighting="uniform")
    groups = res.info["groups"]["model.layers.1.mlp"]
    new_rows = h.model.model.layers[1].mlp.gate.weight.data
    for i, c in enumerate(sorted(groups, key=int)):
        assert torch.allclose(new_rows[i], rows[groups[c]].mean(0), atol=1e-6)
    assert sum(len(g) for g in groups.values()) == 8


def test_quantized_experts_are_refused(tmp_path, quant_recipe, capsys):
    d = build_tiny_mixtral(tmp_path / "m", experts=4)
    recipe = quant_recipe("  - {pass: quantize_rtn, format: int8}\n  - {pass: expert_merge, num_experts: 3}",
                          model=d)
    out = tmp_path / "out"
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", out, "--quiet"], capsys)
    assert rc == 2 and not out.exists()
    assert "expert_merge cannot run after quantize_rtn (passes.0)" in err  # refused by the plan, nothing loaded
