"""export_checkpoint: write the model as a Hugging Face checkpoint folder, `checkpoint/`, in the output.

format "compressor" (default): quantized layers keep their packed weights, scales and zero points (format
"compressor" v1, see compressor.checkpoint_io); `compress` and `compressor.model.load_model` load it back
bit-identically. Unquantized models are written as ordinary safetensors checkpoints that `from_pretrained` loads.

format "compressed-tensors": the serving format vLLM, SGLang and TensorRT-LLM's PyTorch backend load (and
`transformers.AutoModelForCausalLM.from_pretrained`), written by the compressed-tensors library from our own
codes and scales (see compressor.checkpoint_ct): int8/int4 weights (per tensor, channel or group, symmetric or
not), fp8 weights (per tensor, channel or B x B block), int8/fp8 activations (static or dynamic per token), FP8
KV cache. A layer the format cannot hold exactly (nvfp4) stops the pass with an error naming it.

Example:

    export:
      - pass: export_checkpoint
        format: compressed-tensors     # default: compressor
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.registry import Artifact, PassResult, register_pass


class ExportCheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str = Field("checkpoint", pattern=r"^[A-Za-z0-9][\w.-]*$", description="folder name inside the output")
    format: Literal["compressor", "compressed-tensors"] = Field(
        "compressor", description="compressor: our packed format, reloads bit-identically here; compressed-tensors: "
                                  "the format vLLM, SGLang and TensorRT-LLM load")


@register_pass("export_checkpoint", config=ExportCheckpointConfig, consumes=Artifact.TORCH_MODEL,
               produces=Artifact.CHECKPOINT, output_bytes=lambda cfg, tensors: tensors)
def run(handle, cfg: ExportCheckpointConfig, ctx) -> PassResult:
    from compressor.checkpoint_io import quantized_layers, save_compressed

    folder = ctx.workdir / cfg.folder
    folder.mkdir(parents=True, exist_ok=False)
    if cfg.format == "compressed-tensors":
        from compressor import checkpoint_ct
        from compressor.errors import PassError

        try:
            weights = checkpoint_ct.save(handle.model, handle.tokenizer, folder)
        except checkpoint_ct.NotExpressible as e:
            raise PassError("export_checkpoint", [], f"format compressed-tensors: {e}", exit_code=2) from None
    else:
        weights = save_compressed(handle.model, handle.tokenizer, folder)
    n_q = len(quantized_layers(handle.model))
    ctx.logger.info("export_checkpoint: %s (%s, %.1f MB, %d quantized layers)", folder.name, cfg.format,
                    weights.stat().st_size / 1e6, n_q)
    info = {"quantized_layers": n_q} if cfg.format == "compressor" else {"quantized_layers": n_q, "format": cfg.format}
    return PassResult(artifacts=[{"kind": "checkpoint", "path": f"{cfg.folder}/{weights.name}"}], info=info)
