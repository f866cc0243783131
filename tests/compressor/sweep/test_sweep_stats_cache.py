"""Cached per-block input statistics (passes/quantize/_hessians.py StatsCache) in a layer-sequential loop that
quantizes each block after collecting its Hessians, as GPTQ does: a rerun loads every block's statistics
(bit-identical), a run with another group size reuses block 0's and recomputes the blocks whose inputs changed."""

from __future__ import annotations

import pytest
import torch

from compressor import cache
from compressor.calibration.forward_loop import layer_sequential
from compressor.passes.quantize._hessians import StatsCache


def fake_quant(w: torch.Tensor, group: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, group)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
    return (torch.round(g / s).clamp(-8, 7) * s).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    batches = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return tiny_model_dir, batches


def run(tiny, group: int, cache_dir, enabled: bool = True):
    from transformers import AutoModelForCausalLM

    folder, batches = tiny
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    sc = StatsCache(model, batches, cache_dir, enabled)
    seen = {}

    def work(i, block, run_block):
        layers = [(f"model.layers.{i}.{n}", m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        stats, reused = sc.collect(i, block, layers, run_block)
        seen[i] = ({n: st.hessian.clone() for n, st in stats.items()}, reused, stats)
        with torch.no_grad():
            for _, lin in layers:  # quantize the block: the next block's inputs depend on it
                lin.weight.copy_(fake_quant(lin.weight, group))

    layer_sequential(model, batches, work)
    return seen, {k: v.clone() for k, v in model.state_dict().items()}


def test_rerun_loads_identical_statistics_and_another_group_size_reuses_block_0(tiny, tmp_path):
    start = cache.ledger_len()
    a, wa = run(tiny, 32, tmp_path)
    assert [a[i][1] for i in (0, 1)] == [False, False]
    assert len(a[0][0]) == 7  # q, k, v, o, gate, up, down
    stats0 = a[0][2]  # q/k/v and gate/up read one tensor each: one shared accumulation
    assert stats0["model.layers.0.self_attn.q_proj"] is stats0["model.layers.0.self_attn.v_proj"]
    assert stats0["model.layers.0.mlp.gate_proj"] is stats0["model.layers.0.mlp.up_proj"]

    b, wb = run(tiny, 32, tmp_path)
    assert [b[i][1] for i in (0, 1)] == [True, True]
    for i in (0, 1):
        assert all(torch.equal(a[i][0][n], b[i][0][n]) for n in a[i][0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    stats0 = b[0][2]  # sharing survives the round trip through the cache
    assert stats0["model.layers.0.self_attn.q_proj"] is stats0["model.layers.0.self_attn.k_proj"]
    assert stats0["model.layers.0.self_attn.q_proj"].n == 4 * 32
    hits = [h for h in cache.ledger(start) if h[0] == "input-stats"]
    assert len(hits) == 2 and all(s > 0 for _, _, s in hits)  # each hit reports the seconds it saved

    c, wc = run(tiny, 16, tmp_path)
    # block 0 sees the same inputs (nothing quantized before it); block 1 sees block 0 quantized differently
    assert [c[i][1] for i in (0, 1)] == [True, False]
    assert all(torch.equal(a[0][0][n], c[0][0][n]) for n in a[0][0])
    assert not torch.equal(a[1][0]["model.layers.1.mlp.down_proj"], c[1][0]["model.layers.1.mlp.down_proj"])
    assert not torch.equal(wa["model.layers.0.mlp.down_proj.weight"], wc["model.layers.0.mlp.down_proj.weight"])


def test_disabled_cache_always_recomputes(tiny, tmp_path):
    run(tiny, 32, tmp_path, enabled=False)
    d, _ = run(tiny, 32, tmp_path, enabled=False)
    assert [d[i][1] for i in (0, 1)] == [False, False]
    assert not (tmp_path / "input-stats").exists()
