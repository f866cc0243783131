"""MoE export forms: the registered sparse / dense experts forwards (and the swapped LinearExperts forwards)
compute what the default forward computes, and the ONNX graphs exported with them match torch on shapes other
than the traced one (batch > 1 with one token and no past included)."""

from __future__ import annotations

import time

import onnx
import pytest
import torch

from compressor.kernels.qlinear import QuantLinear
from compressor.moe import ExpertMLP, LinearExperts, unfuse_experts
from compressor.moe_export import (DENSE, SPARSE, dense_experts_forward, export_experts, pick_mode,
                                   sparse_experts_forward)
from compressor.onnx_export import export_causal_lm, verify_against_torch

# verify_against_torch's defaults plus decode steps of several sequences (one token, with and without a past).
CASES = ((1, 5, 0), (3, 1, 7), (2, 6, 3), (4, 1, 0), (1, 1, 0))


def _randomize(model, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model.eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256)
    return _randomize(MixtralForCausalLM(cfg))


def tiny_qwen_moe():
    """Qwen2-MoE: top-k routing without renormalisation plus a sigmoid-gated shared expert."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
    return _randomize(Qwen2MoeForCausalLM(cfg), seed=1)


def _quantize_experts_int8(model) -> int:
    """Every expert Linear -> per-channel symmetric INT8 QuantLinear (round to nearest)."""
    n = 0
    for mlp in [m for m in model.modules() if isinstance(m, ExpertMLP)]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name)
            q = QuantLinear.like(lin, "int8", group_size=0, symmetric=True)
            w = lin.weight.data
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
            q.weight_packed.copy_(torch.round(w / scale).clamp(-127, 127).to(torch.int8))
            q.weight_scale.copy_(scale)
            setattr(mlp, name, q)
            n += 1
    return n


def _ids(model, batch: int, seq: int, seed: int = 0):
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _max_diff_to_default(model, mode: str) -> float:
    diffs = []
    with torch.no_grad():
        for batch, seq in ((3, 7), (2, 1), (1, 1), (1, 13)):
            ids = _ids(model, batch, seq, seed=batch * 10 + seq)
            ref = model(input_ids=ids).logits
            with export_experts(model, mode):
                got = model(input_ids=ids).logits
            diffs.append((got - ref).abs().max().item())
    return max(diffs)


@pytest.fixture(scope="module")
def models():
    unfused = tiny_mixtral()
    assert unfuse_experts(unfused) == 2
    quantized = tiny_qwen_moe()
    unfuse_experts(quantized)
    assert _quantize_experts_int8(quantized) == 2 * 4 * 3
    return {"mixtral": tiny_mixtral(), "qwen2_moe": tiny_qwen_moe(), "mixtral_unfused": unfused,
            "qwen2_moe_unfused_int8": quantized}


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "mixtral_unfused", "qwen2_moe_unfused_int8"])
def test_export_forms_compute_the_default_forward(models, name, mode):
    diff = _max_diff_to_default(models[name], mode)
    print(f"{name} {mode}: max abs diff {diff:.3g}")
    assert diff < 1e-5


def test_the_forms_are_dispatched_and_everything_is_restored(models):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    fused, unfused = models["qwen2_moe"], models["mixtral_unfused"]
    before = fused.config._experts_implementation
    experts = fused.model.layers[0].mlp.experts
    for mode, name, fn in (("sparse", SPARSE, sparse_experts_forward), ("dense", DENSE, dense_experts_forward)):
        with export_experts(fused, mode):
            assert experts.config._experts_implementation == name
            assert ALL_EXPERTS_FUNCTIONS.get_interface(experts.config._experts_implementation, None) is fn
        assert fused.config._experts_implementation == before
    lin = unfused.model.layers[1].mlp.experts
    assert isinstance(lin, LinearExperts)
    with pytest.raises(RuntimeError, match="boom"):
        with export_experts(unfused, "dense"):
            assert "forward" in vars(lin)
            raise RuntimeError("boom")
    assert "forward" not in vars(lin) and type(lin).forward is LinearExperts.forward
    with pytest.raises(ValueError):
        with export_experts(fused, "grouped"):
            pass


def test_pick_mode():
    assert pick_mode("ort") == "sparse"
    assert pick_mode("tensorrt") == "dense"
    with pytest.raises(ValueError):
        pick_mode("coreml")


def _export_and_verify(model, mode: str, path) -> list[dict]:
    t = time.perf_counter()
    with export_experts(model, mode):
        export_causal_lm(model, path)
    took = time.perf_counter() - t
    # The reference is the model's own default forward (outside the block).
    checks = verify_against_torch(model, path, cases=CASES)
    err = max(c["max_rel_error"] for c in checks)
    print(f"{path.stem}: export {took:.1f} s, max rel error {err:.3g}")
    assert [(c["batch"], c["seq"], c["past"]) for c in checks] == list(CASES)
    assert err < 1e-4, checks
    return checks


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_mixtral_exports_in_both_forms(models, mode, tmp_path):
    _export_and_verify(models["mixtral"], mode, tmp_path / f"mixtral_{mode}.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / f"mixtral_{mode}.onnx")).graph.node}
    # sparse: the routed tokens are gathered per expert; dense: fixed shapes, nothing data-dependent.
    assert ("NonZero" in ops) == (mode == "sparse"), sorted(ops)


def test_qwen_moe_with_shared_expert_exports(models, tmp_path):
    _export_and_verify(models["qwen2_moe"], "sparse", tmp_path / "qwen2_moe_sparse.onnx")


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_unfused_int8_experts_export_and_stay_quantized(models, mode, tmp_path):
    """LinearExperts' own forward does not export (it branches on an expert's token count); swapped, it does."""
    path = tmp_path / f"qwen2_moe_unfused_int8_{mode}.onnx"
    _export_and_verify(models["qwen2_moe_unfused_int8"], mode, path)
    int8 = [t for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and ".experts." in t.name]
    assert len(int8) == 2 * 4 * 3  # every expert weight kept packed, dequantized in the graph
