"""Compressed checkpoints reload bit-identically; unquantized ones are ordinary HF checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.context import RunContext
from compressor.kernels.qlinear import QuantLinear
from compressor.model import load_model
from compressor.recipe import ModelSpec
from compressor.registry import get_pass
from compressor.targets import get_target


@pytest.mark.parametrize("cfg", [{"format": "int8"}, {"format": "int4", "granularity": "per_group", "group_size": 32,
                                                      "symmetric": False}, {"format": "fp8"}])
def test_roundtrip_is_bit_identical(tiny_model_dir, tmp_path, cfg):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    ctx = RunContext(get_target("cpu"), tmp_path, tmp_path, quiet=True)
    rtn = get_pass("quantize_rtn")
    rtn.run(h, rtn.config(**cfg), ctx)
    res = get_pass("export_checkpoint").run(h, get_pass("export_checkpoint").config(), ctx)
    assert res.artifacts == [{"kind": "checkpoint", "path": "checkpoint/model.safetensors"}]
    qcfg = json.loads((tmp_path / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressor" and len(qcfg["layers"]) == 14
    back = load_model(ModelSpec(source=str(tmp_path / "checkpoint")))
    for (n, a), (_, b) in zip(h.model.state_dict().items(), back.model.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                                                  b.view(torch.uint8) if b.dtype.itemsize == 1 else b), n
    ids = torch.randint(0, h.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(h.model(ids).logits, back.model(ids).logits)
    assert sum(isinstance(m, QuantLinear) for m in back.model.modules()) == 14


def test_unquantized_checkpoint_loads_with_from_pretrained(tiny_model_dir, tmp_path):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    ctx = RunContext(get_target("cpu"), tmp_path, tmp_path, quiet=True)
    get_pass("export_checkpoint").run(h, get_pass("export_checkpoint").config(), ctx)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    ids = torch.randint(0, h.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, h.model(ids).logits)
