"""The MoE fixtures: a miniature build (same code, tiny spec) is deterministic, trains on the calibration part
only, saves an ordinary HF checkpoint with its routing table, and is what `asset:moe-*-fixture` resolves to.
(test_moe_recipe_slow.py trains the real Mixtral fixture and runs a shipped recipe on it.)"""

from __future__ import annotations

import hashlib
import json

import pytest

from compressor import assets, moe_fixtures

TINY = dict(hidden=32, layers=1, heads=2, kv_heads=1, experts=4, expert_inter=16, shared_inter=16, vocab=300,
            positions=256, seq_len=32, batch=4, steps=3, warmup=1, tokenizer_chars=60_000, train_tokens=8_000,
            table_windows=2, table_len=32)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A COMPRESSOR_HOME holding the two corpora (prepared from the system packages, seconds)."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("COMPRESSOR_HOME", str(home))
    assets.prepare("python-docs")
    assets.prepare("shakespeare")
    yield home
    mp.undo()


@pytest.mark.parametrize("name", ["moe-mixtral", "moe-qwen"])
def test_miniature_build_is_deterministic_and_reloads(name, corpora, tmp_path):
    from transformers import AutoModelForCausalLM

    a = moe_fixtures.build(name, tmp_path / "a", quiet=True, **TINY)
    b = moe_fixtures.build(name, tmp_path / "b", quiet=True, **TINY)
    sha = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (a, b)]
    assert sha[0] == sha[1]
    meta = json.loads((a / "fixture.json").read_text())
    assert meta["weights_sha256"] == sha[0] and meta["spec"]["steps"] == 3
    assert meta["train_tokens"] == 3 * 4 * 32
    share = meta["held_out"]["shakespeare"]["token_share"]["model.layers.0.mlp"]
    assert len(share) == 4 and sum(share) == pytest.approx(1.0, abs=1e-3)
    m = AutoModelForCausalLM.from_pretrained(a)
    assert m.config.model_type == ("mixtral" if name == "moe-mixtral" else "qwen2_moe")
    assert m.config.num_experts_per_tok == 2 and not m.config.output_router_logits
    assert m.model.layers[0].mlp.gate.weight.shape == (4, 32)
    if name == "moe-qwen":
        assert m.config.norm_topk_prob is False and hasattr(m.model.layers[0].mlp, "shared_expert")
    assert "| 0 | python-docs |" in moe_fixtures.format_table(meta)


def test_training_text_is_the_calibration_part_only(corpora):
    from compressor.calibration.data import load_documents, split_documents

    spec = moe_fixtures.FIXTURES["moe-mixtral"]
    texts = moe_fixtures.training_texts(spec)
    for src in spec.corpora:
        _, held = split_documents(load_documents(src))
        assert not set(held) & set(texts[src])


def test_asset_names_resolve_to_a_spec_keyed_folder_and_the_command_copies_it(corpora, tmp_path, capsys):
    p = assets.asset_path("moe-mixtral-fixture")
    key = moe_fixtures.fixture_key(moe_fixtures.FIXTURES["moe-mixtral"])
    assert p.name == f"moe-mixtral-fixture-{key[:12]}" and p.parent == corpora / "assets"
    assert assets.asset_path("moe-qwen-fixture") != p
    moe_fixtures.build("moe-mixtral", p, quiet=True, **TINY)  # stands in for the real build in this test
    assert moe_fixtures.main(["moe-mixtral", "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (p / "model.safetensors").read_bytes()
    assert "| layer | corpus | e0 | e1 | e2 | e3 |" in capsys.readouterr().out
    assert moe_fixtures.main(["moe-mixtral", "--out", str(tmp_path / "copy")]) == 2  # refuses an existing folder
