from __future__ import annotations

import pytest
from pydantic import BaseModel

from compressor import registry
from compressor.registry import Artifact, DuplicatePass, UnknownPass, get_pass, register_pass


class _Cfg(BaseModel):
    x: int = 1


def test_duplicate_name_is_an_error():
    get_pass("quantize_rtn")  # registered through its entry point
    with pytest.raises(DuplicatePass, match="quantize_rtn"):
        register_pass("quantize_rtn", config=_Cfg, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL)(
            lambda h, c, ctx: None)


def test_unknown_pass_suggests_close_name():
    with pytest.raises(UnknownPass) as e:
        get_pass("export_onx")
    assert e.value.suggestion == "export_onnx"


def test_pass_declarations():
    rtn, onnx_, ckpt = get_pass("quantize_rtn"), get_pass("export_onnx"), get_pass("export_checkpoint")
    assert not rtn.lowers and onnx_.lowers and ckpt.lowers
    assert onnx_.produces is Artifact.ONNX and ckpt.produces is Artifact.CHECKPOINT
    cfg = rtn.config(format="fp8")
    assert {f.value for f in rtn.formats(cfg)} == {"fp8"}
    assert "quantize_rtn" in registry.available()


def test_passes_cli_lists_config_fields():
    from click.testing import CliRunner

    from compressor.cli import cli

    res = CliRunner().invoke(cli, ["passes"])
    assert res.exit_code == 0
    assert "quantize_rtn  [torch_model -> torch_model]" in res.output
    assert "group_size" in res.output and "opset" in res.output
