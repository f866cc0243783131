"""export_onnx: the model as an ONNX graph with KV cache, `<folder>/model.onnx`, checked in ONNX Runtime.

The graph takes input_ids [batch, seq], attention_mask [batch, total_seq] and past_key_values.{i}.key/value
[batch, kv_heads, past_seq, head_dim] and returns logits [batch, seq, vocab] and present.{i}.key/value; batch,
seq, past_seq and total_seq are named dynamic dimensions (torch dynamo exporter).

Flavours (how quantized layers appear; every one carries our own codes and scales, nothing is re-quantized):
  reference  each QuantLinear's dequantization as plain ops (Cast/Mul...): exactly the torch numerics, any format.
  tensorrt   explicit quantization by TensorRT's rules: DequantizeLinear weights (INT8/FP8 per-channel, INT4/FP8
             blocks, opset 21), Q/DQ on inputs with static activation scales, zero points 0; MoE experts in the
             dense fixed-shape form. Checked after export by the TensorRT rules (compressor.tensorrt_rules).
  ort        what ONNX Runtime runs fast on CPU: MatMulNBits for INT4, U8S8 QDQ for W8A8, QDQ for FP8.
             With `fused: true` (the default) Llama-family models (llama, qwen2, mistral without sliding window;
             default RoPE; float32) are not traced but built from ONNX Runtime's fused contrib ops
             (compressor.ort_builder): per layer SkipSimplifiedLayerNormalization, one packed QKV projection,
             GroupQueryAttention with RoPE and the KV cache inside, o_proj, packed gate/up + SiLU, down_proj;
             ~10 nodes a layer instead of ~70, which halves an FP32 decode step on CPU. Same inputs and outputs
             as the traced graph; the attention mask must be all ones or right-padded (no left padding). Other
             architectures fall back to the traced graph (the report notes why); `fused: true` set explicitly
             refuses them instead. `fused: false` always traces.
Schemes a flavour cannot carry (asymmetric weights for tensorrt, dynamic activation scales, NVFP4) are refused
with the layer named.

After export, the graph is run in ONNX Runtime on shapes other than the traced ones (a prefill with an empty
cache and a decode step) and compared with torch; the relative error is recorded, and a mismatch fails the pass.

Example:

    export:
      - pass: export_onnx
        flavour: tensorrt   # folder onnx-tensorrt
        opset: 21           # INT4 blocks need 21; FP8 19+; INT8 18+
      - pass: export_onnx
        flavour: ort        # folder onnx-ort
        fused: true         # GroupQueryAttention etc. for Llama-family models (the default)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass


class ExportOnnxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    flavour: Literal["reference", "tensorrt", "ort"] = Field(
        "reference", description="reference (exact dequant ops), tensorrt (QDQ by TensorRT's rules), ort (fast CPU)")
    opset: int = Field(18, ge=18, le=21, description="ONNX opset (18 or 21 tested; FP8 weights need 19+, INT4 QDQ 21)")
    folder: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$",
                               description="folder inside the output (default: onnx, or onnx-<flavour>)")
    verify: bool = Field(True, description="compare ONNX Runtime with torch on untraced shapes after export")
    max_rel_error: float = Field(1e-3, gt=0, description="largest accepted relative error of the verification")
    tensorrt_version: str = Field("11.5", pattern=r"^\d+\.\d+(\.\d+)*$",
                                  description="TensorRT release whose rules the tensorrt flavour is checked against")
    matmul_nbits_accuracy: Literal[0, 4] = Field(
        0, description="ort flavour: MatMulNBits math, 0 float (exact) or 4 int8 (activations quantized per block "
                       "on the fly; faster)")
    moe_plugin: bool = Field(True, description="tensorrt flavour: MoE blocks as the compressor MoE plugin node "
                                               "(false: dense standard ops)")
    max_plugin_rel_error: float = Field(5e-2, gt=0, description="largest accepted relative error of the plugin's "
                                                                 "BF16 reference against the model")
    fused: bool = Field(True, description="ort flavour: build Llama-family models from ONNX Runtime's fused ops "
                                          "(GroupQueryAttention, SkipSimplifiedLayerNormalization, packed QKV); "
                                          "others fall back to the traced graph unless fused is set explicitly")

    @model_validator(mode="after")
    def _fused_is_ort_only(self):
        if self.fused and "fused" in self.model_fields_set and self.flavour != "ort":
            raise ValueError(f"fused: only the ort flavour has a fused graph (flavour is {self.flavour})")
        return self

    @property
    def out_folder(self) -> str:
        return self.folder or ("onnx" if self.flavour == "reference" else f"onnx-{self.flavour}")


def _quantized_schemes(model) -> dict[str, dict]:
    from compressor.kernels.qlinear import QuantLinear

    return {n: m.scheme for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _check_scheme(name: str, schemes: dict[str, dict], cfg: ExportOnnxConfig) -> None:
    from compressor.onnx_lowering import check_lowerable

    formats = {s["format"] for s in schemes.values()}
    if cfg.opset < 19 and "fp8" in formats:
        raise PassError(name, [], f"FP8 weights need opset 19 or newer (Cast from float8); "
                        f"set opset: 21 (now {cfg.opset})", exit_code=2)
    if cfg.flavour == "tensorrt" and cfg.opset < 21 and "int4" in formats:
        raise PassError(name, [], f"INT4 weights in the tensorrt flavour need opset 21 (block DequantizeLinear); "
                        f"set opset: 21 (now {cfg.opset})", exit_code=2)
    try:
        check_lowerable(schemes, cfg.flavour)
    except ValueError as e:
        raise PassError(name, [], str(e), exit_code=2) from None


def _check_activation_qdq(path, layers: dict) -> None:
    import onnx

    from compressor.onnx_lowering import check_activation_qdq

    problems = check_activation_qdq(onnx.load(str(path), load_external_data=False), layers)
    if problems:
        raise PassError("export_onnx", [], f"activation Q/DQ do not match the calibrated scales "
                        f"({len(problems)} layers), first: {problems[0]}")


def _use_fused(model, cfg: ExportOnnxConfig) -> tuple[bool, str | None]:
    """(build the fused graph?, why the default fell back to tracing). An explicit `fused: true` refuses a model
    without a fused graph instead of falling back."""
    if cfg.flavour != "ort" or not cfg.fused:
        return False, None
    from compressor.ort_builder import unsupported_reason

    why = unsupported_reason(model)
    if why is None:
        return True, None
    if "fused" in cfg.model_fields_set:
        raise PassError("export_onnx", [], f"fused: no fused ONNX Runtime graph for this model: {why} "
                        f"(set fused: false to trace it)", exit_code=2)
    return False, why


# memory_factor: the dynamo export peaks at 9-13x the fp32 model's bytes (peak RSS measured for the 538 MB
# SmolLM2-135M on the CPU machine, including the eval that follows: 5.2 GB for INT8, 7.5 GB for INT4).
@register_pass("export_onnx", config=ExportOnnxConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.ONNX,
               memory_factor=13.0, output_bytes=lambda cfg, tensors: tensors)
def run(handle, cfg: ExportOnnxConfig, ctx) -> PassResult:
    from compressor.onnx_export import export_causal_lm, verify_against_torch

    _check_scheme("export_onnx", _quantized_schemes(handle.model), cfg)
    fused, fallback = _use_fused(handle.model, cfg)
    folder = ctx.workdir / cfg.out_folder
    folder.mkdir(parents=True, exist_ok=False)
    path = folder / "model.onnx"
    ctx.logger.info("export_onnx: exporting the %s flavour (%s, opset %d)", cfg.flavour,
                    "fused ONNX Runtime ops" if fused else "torch dynamo", cfg.opset)
    try:
        forms = export_causal_lm(handle.model, path, opset=cfg.opset, flavour=cfg.flavour, moe_plugin=cfg.moe_plugin,
                                 nbits_accuracy=cfg.matmul_nbits_accuracy, fused=fused)
    except ValueError as e:  # a scheme the MoE plugin cannot carry, named by the plugin export
        raise PassError("export_onnx", [], str(e), exit_code=2) from None
    info = {"flavour": cfg.flavour, "opset": cfg.opset, "lowered": forms,
            "bytes": sum(f.stat().st_size for f in folder.iterdir())}
    if cfg.flavour == "ort":
        info["fused"] = fused
    if fallback:
        info["notes"] = [f"{cfg.out_folder}: traced graph, not the fused one: {fallback}"]
        ctx.logger.info("export_onnx: no fused graph (%s); traced instead", fallback)
    if cfg.flavour == "tensorrt":
        from compressor import tensorrt_rules

        findings = tensorrt_rules.check(path, cfg.tensorrt_version)
        info["tensorrt_rules"] = {"version": cfg.tensorrt_version, "findings": [str(f) for f in findings]}
        if findings:
            raise PassError("export_onnx", [], f"the tensorrt flavour breaks TensorRT {cfg.tensorrt_version} rules "
                            f"({len(findings)} findings), first: {findings[0]}")
    if cfg.verify and forms.get("moe_plugin"):
        from compressor.onnx_export import verify_plugin_reference

        checks = verify_plugin_reference(handle.model)
        worst = max(c["max_rel_error"] for c in checks)
        info["verification"] = checks
        info.setdefault("notes", []).append(f"{cfg.out_folder}: {forms['moe_plugin']} MoE blocks are TensorRT plugin nodes, which ONNX "
                         f"Runtime cannot run; checked instead through the plugin's torch reference (BF16 in and "
                         f"out): max relative error {worst:.2e} against the model. The CUDA kernel itself is "
                         f"checked by scripts/gpu_check_moe.py on a GPU.")
        if worst > cfg.max_plugin_rel_error:
            raise PassError("export_onnx", [], f"the MoE plugin reference differs from the model: relative error "
                            f"{worst:.3g} > max_plugin_rel_error {cfg.max_plugin_rel_error}")
    elif cfg.verify:
        ctx.logger.info("export_onnx: verifying against torch in ONNX Runtime on untraced shapes")
        from compressor.onnx_lowering import static_activation_layers

        static = static_activation_layers(handle.model) if cfg.flavour != "reference" else {}
        if static:
            from compressor import ort_builder

            # the fused graph concatenates q/k/v and gate/up that share their input scale: checked as it names them
            _check_activation_qdq(path, ort_builder.static_activation_layers(handle.model) if fused else static)
            info["activation_qdq_checked"] = len(static)
            # End to end (not gated): rounding-boundary flips make it chaotic; see compressor.onnx_lowering.
            info["verification_with_activation_qdq"] = verify_against_torch(handle.model, path, cases=((1, 5, 0),))
        nbits4 = cfg.flavour == "ort" and cfg.matmul_nbits_accuracy != 0 and forms.get("matmul_nbits")
        if nbits4:  # int8 math inside MatMulNBits: recorded end to end, verified exactly with float math
            info["verification_with_int8_matmul_nbits"] = verify_against_torch(handle.model, path)
        checks = verify_against_torch(handle.model, path, bypass_activations=bool(static), exact_nbits=bool(nbits4))
        info["verification"] = checks
        worst = max(c["max_rel_error"] for c in checks)
        if worst > cfg.max_rel_error:
            raise PassError("export_onnx", [], f"ONNX Runtime output differs from torch: relative error {worst:.3g} "
                            f"> max_rel_error {cfg.max_rel_error} ({checks})")
        ctx.logger.info("export_onnx: ONNX Runtime matches torch, max relative error %.2e", worst)
    return PassResult(artifacts=[{"kind": "onnx", "path": f"{cfg.out_folder}/model.onnx", "flavour": cfg.flavour}],
                      info=info)
