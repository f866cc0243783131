"""tensorrt_rules: lint an exported ONNX graph against TensorRT's quantization rules and op allow-list for a
given TensorRT release (compressor.tensorrt_rules); the run fails naming each offending node.

export_onnx already checks its tensorrt flavour against its `tensorrt_version`; this pass checks any exported
folder against another release, e.g. an older TensorRT a deployment is pinned to. `compress check-onnx FILE`
runs the same check on any file.

Example:

    export:
      - pass: export_onnx
        flavour: tensorrt
      - pass: tensorrt_rules
        tensorrt_version: "10.0"
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass


class TensorRTRulesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    onnx_folder: str = Field("onnx-tensorrt", pattern=r"^[A-Za-z0-9][\w.-]*$")
    tensorrt_version: str = Field("11.5", pattern=r"^\d+\.\d+(\.\d+)*$")


@register_pass("tensorrt_rules", config=TensorRTRulesConfig, consumes=Artifact.ONNX, produces=Artifact.ONNX)
def run(handle, cfg: TensorRTRulesConfig, ctx) -> PassResult:
    from compressor import tensorrt_rules

    path = ctx.workdir / cfg.onnx_folder / "model.onnx"
    try:
        findings = tensorrt_rules.check(path, cfg.tensorrt_version)
    except tensorrt_rules.CheckError as e:
        raise PassError("tensorrt_rules", [], str(e), exit_code=2) from None
    if findings:
        listed = "; ".join(str(f) for f in findings[:5]) + (f"; and {len(findings) - 5} more" if len(findings) > 5 else "")
        raise PassError("tensorrt_rules", [], f"{cfg.onnx_folder}/model.onnx breaks TensorRT {cfg.tensorrt_version} "
                        f"rules: {listed}", exit_code=2)
    ctx.logger.info("tensorrt_rules: %s/model.onnx fits TensorRT %s rules", cfg.onnx_folder, cfg.tensorrt_version)
    return PassResult(artifacts=[], info={"tensorrt_version": cfg.tensorrt_version, "findings": 0})
