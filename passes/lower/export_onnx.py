"""export_onnx: the model as an ONNX graph with KV cache, `onnx/model.onnx`, checked in ONNX Runtime.

The graph takes input_ids [batch, seq], attention_mask [batch, total_seq] and past_key_values.{i}.key/value
[batch, kv_heads, past_seq, head_dim] and returns logits [batch, seq, vocab] and present.{i}.key/value; batch,
seq, past_seq and total_seq are named dynamic dimensions (torch dynamo exporter). Quantized layers stay
quantized in the graph: their packed integer/FP8 initializers and scales are dequantized by ONNX ops, so the
file is small and computes what the torch model computes.

After export, the graph is run in ONNX Runtime on shapes other than the traced ones (a prefill with an empty
cache and a decode step) and compared with torch; the relative error is recorded, and a mismatch fails the pass.

Example:

    export:
      - pass: export_onnx
        opset: 18          # 21 for FP8 weights (Cast from float8 needs opset 19+)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass


class ExportOnnxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    opset: int = Field(18, ge=18, le=21, description="ONNX opset (18 or 21 tested; FP8 weights need 19+)")
    folder: str = Field("onnx", pattern=r"^[A-Za-z0-9][\w.-]*$")
    verify: bool = Field(True, description="compare ONNX Runtime with torch on untraced shapes after export")
    max_rel_error: float = Field(1e-3, gt=0, description="largest accepted relative error of the verification")


# memory_factor: the dynamo export peaks at 9-13x the fp32 model's bytes (peak RSS measured for the 538 MB
# SmolLM2-135M on the CPU machine, including the eval that follows: 5.2 GB for INT8, 7.5 GB for INT4).
@register_pass("export_onnx", config=ExportOnnxConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.ONNX,
               memory_factor=13.0, output_bytes=lambda cfg, tensors: tensors)
def run(handle, cfg: ExportOnnxConfig, ctx) -> PassResult:
    from compressor.kernels.qlinear import QuantLinear
    from compressor.onnx_export import export_causal_lm, verify_against_torch

    if cfg.opset < 19 and any(isinstance(m, QuantLinear) and m.fmt == "fp8" for m in handle.model.modules()):
        raise PassError("export_onnx", [], f"FP8 weights need opset 19 or newer (Cast from float8); "
                        f"set opset: 21 (now {cfg.opset})", exit_code=2)
    folder = ctx.workdir / cfg.folder
    folder.mkdir(parents=True, exist_ok=False)
    path = folder / "model.onnx"
    ctx.logger.info("export_onnx: exporting (torch dynamo, opset %d)", cfg.opset)
    export_causal_lm(handle.model, path, opset=cfg.opset)
    info = {"opset": cfg.opset, "bytes": sum(f.stat().st_size for f in folder.iterdir())}
    if cfg.verify:
        ctx.logger.info("export_onnx: verifying against torch in ONNX Runtime on untraced shapes")
        checks = verify_against_torch(handle.model, path)
        info["verification"] = checks
        worst = max(c["max_rel_error"] for c in checks)
        if worst > cfg.max_rel_error:
            raise PassError("export_onnx", [], f"ONNX Runtime output differs from torch: relative error {worst:.3g} "
                            f"> max_rel_error {cfg.max_rel_error} ({checks})")
        ctx.logger.info("export_onnx: ONNX Runtime matches torch, max relative error %.2e", worst)
    return PassResult(artifacts=[{"kind": "onnx", "path": f"{cfg.folder}/model.onnx"}], info=info)
