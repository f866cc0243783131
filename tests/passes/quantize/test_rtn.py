"""quantize_rtn on a tiny Llama: real packed storage, errors naming the layer, outputs close to the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.context import RunContext
from compressor.errors import PassError
from compressor.kernels.qlinear import QuantLinear
from compressor.model import load_model
from compressor.recipe import ModelSpec
from compressor.registry import get_pass
from compressor.targets import get_target


def _run(model_dir, **cfg):
    h = load_model(ModelSpec(source=str(model_dir)))
    info = get_pass("quantize_rtn")
    res = info.run(h, info.config(**cfg), RunContext(get_target("cpu"), Path("."), Path("."), quiet=True))
    return h, res


@pytest.mark.parametrize("cfg,min_db", [
    ({"format": "int8"}, 38.0),
    ({"format": "int4", "granularity": "per_group", "group_size": 32}, 17.0),
    ({"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False}, 18.0),
    ({"format": "fp8"}, 28.0),
])
def test_rtn_replaces_linears_with_packed_layers(tiny_model_dir, cfg, min_db):
    base = load_model(ModelSpec(source=str(tiny_model_dir)))
    h, res = _run(tiny_model_dir, **cfg)
    q = {n: m for n, m in h.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(q) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); lm_head ignored
    assert "lm_head" not in q and not isinstance(h.model.lm_head, QuantLinear)
    assert res.info["layers_quantized"] == 14 and res.info["sqnr_db_min"] > min_db
    ids = torch.randint(0, h.config.vocab_size, (1, 32))
    with torch.no_grad():
        a, b = base.model(ids).logits, h.model(ids).logits
    rel = float((a - b).norm() / a.norm())
    assert rel < 0.25, rel
    assert h.state_bytes() < base.state_bytes()


def test_group_size_that_does_not_divide_names_the_layer(tiny_model_dir):
    with pytest.raises(PassError) as e:
        _run(tiny_model_dir, format="int4", granularity="per_group", group_size=48)
    assert e.value.exit_code == 2
    assert "group_size 48 does not divide the input width 64 of layer model.layers.0.self_attn.q_proj" in str(e.value)


def test_ragged_skip_policy_keeps_those_layers(tiny_model_dir):
    # 128 divides down_proj's input (128) but not the 64-wide inputs of the other layers.
    h, res = _run(tiny_model_dir, format="int4", granularity="per_group", group_size=128, ragged="skip")
    assert res.info["layers_quantized"] == 2
    assert len(res.info["layers_skipped_ragged"]) == 12
    assert isinstance(h.model.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(h.model.model.layers[0].mlp.up_proj, QuantLinear)


def test_config_rules():
    cfg = get_pass("quantize_rtn").config
    with pytest.raises(ValueError, match="needs group_size"):
        cfg(format="int4", granularity="per_group")
    with pytest.raises(ValueError, match="only used with granularity per_group"):
        cfg(format="int4", group_size=64)
    with pytest.raises(ValueError, match="symmetric"):
        cfg(format="fp8", symmetric=False)
