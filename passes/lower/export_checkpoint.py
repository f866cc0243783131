"""export_checkpoint: write the model as a Hugging Face checkpoint folder, `checkpoint/`, in the output.

Quantized layers keep their packed weights, scales and zero points (format "compressor" v1, see
compressor.checkpoint_io); `compress` and `compressor.model.load_model` load it back bit-identically.
Unquantized models are written as ordinary safetensors checkpoints that `from_pretrained` loads.

Example:

    export:
      - pass: export_checkpoint
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compressor.registry import Artifact, PassResult, register_pass


class ExportCheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str = Field("checkpoint", pattern=r"^[A-Za-z0-9][\w.-]*$", description="folder name inside the output")


@register_pass("export_checkpoint", config=ExportCheckpointConfig, consumes=Artifact.TORCH_MODEL,
               produces=Artifact.CHECKPOINT, output_bytes=lambda cfg, tensors: tensors)
def run(handle, cfg: ExportCheckpointConfig, ctx) -> PassResult:
    from compressor.checkpoint_io import quantized_layers, save_compressed

    folder = ctx.workdir / cfg.folder
    folder.mkdir(parents=True, exist_ok=False)
    weights = save_compressed(handle.model, handle.tokenizer, folder)
    n_q = len(quantized_layers(handle.model))
    ctx.logger.info("export_checkpoint: %s (%.1f MB, %d quantized layers)", folder.name, weights.stat().st_size / 1e6, n_q)
    return PassResult(artifacts=[{"kind": "checkpoint", "path": f"{cfg.folder}/{weights.name}"}],
                      info={"quantized_layers": n_q})
