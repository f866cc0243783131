from __future__ import annotations

import math

import torch

from compressor.eval.metrics import compare_models, perplexity
from compressor.model import load_model
from compressor.recipe import ModelSpec


def test_identical_models_have_zero_kl_and_full_agreement(tiny_model_dir):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    w = torch.randint(0, h.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    b, r = compare_models(h.model, h.model, w)
    assert abs(r["kl_divergence"]) < 1e-7 and r["top1_agreement"] == 1.0
    assert b["perplexity"] == r["perplexity"] and b["tokens"] == 3 * 23


def test_perplexity_matches_transformers_loss(tiny_model_dir):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    w = torch.randint(0, h.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [float(h.model(input_ids=x[None], labels=x[None]).loss) for x in w]
    assert math.isclose(perplexity(h.model, w), math.exp(sum(losses) / 2), rel_tol=1e-5)


def test_kl_is_positive_for_a_different_model(tiny_model_dir, tmp_path):
    from tests.conftest import build_tiny_llama

    a = load_model(ModelSpec(source=str(tiny_model_dir)))
    b = load_model(ModelSpec(source=str(build_tiny_llama(tmp_path / "other", seed=5))))
    w = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    _, r = compare_models(a.model, b.model, w)
    assert r["kl_divergence"] > 1e-4 and r["top1_agreement"] < 1.0
