"""distill: knowledge distillation from the original model, to win back quality lost to pruning or quantization.

The teacher is the model the recipe loaded, read fresh from its source (or `teacher:`, another HF folder with the
same vocabulary); it is frozen. The student is the model as the earlier passes left it, trained in float32:
  loss = T^2 KL(teacher_T || student_T) on the logits  + feature_loss_weight * MSE of matched hidden states
         + ce_weight * next-token cross entropy.
A quantized student (QuantLinear layers) is trained quantization-aware: each layer gets a float shadow weight
that the forward fake-quantizes on the layer's fixed scales and zero points (straight-through gradients); at the
end the shadow weights are re-packed into codes with the same scales (int8, int4, fp8, nvfp4). Weights that the
prune pass zeroed stay zero (`keep_sparsity`); `freeze` keeps parameters fixed by name pattern.

Data: the recipe's calibration windows, or `train_data` (a source like `calibration:`). Both come from the part
of each corpus that evaluation never reads (calibration.data's held-out split). A seeded slice of the windows
(`holdout_samples`, default 10%) is kept out of training to measure the KL to the teacher before and after.

Training: AdamW, warmup then cosine/linear decay, gradient accumulation, clipping, `steps` and/or `epochs`, a
wall budget `max_minutes` (stops cleanly; the report says so). Every `checkpoint_every` steps the trainable
weights and optimizer state are saved under the cache (key: this config, the student's weights, the teacher,
the data, the seed), so an interrupted run resumes from its last checkpoint and ends with the weights of an
uninterrupted one. The checkpoints are deleted when training completes; --no-cache neither reads nor writes them.

Example (recover INT4 RTN on SmolLM2; relative paths in `teacher:`/`train_data:` are read from the recipe's
folder, like every path in a recipe):

    calibration: {source: [asset:python-docs, asset:shakespeare], num_samples: 128, seq_len: 512}
    passes:
      - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 64}
      - pass: distill
        temperature: 2.0
        lr: 1.0e-5
        steps: 200
        warmup_steps: 20
        micro_batch_size: 2
        grad_accum: 4
        max_minutes: 60
        checkpoint_every: 50
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import PassError
from compressor.recipe import DataSpec
from compressor.registry import Artifact, PassResult, register_pass

NAME = "distill"


class DistillConfig(BaseModel):
    """Knowledge distillation from the original model (logits KL, optional hidden-state and token losses)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: str | None = Field(None, description="HF folder of the teacher; default: the recipe's model as loaded")
    train_data: DataSpec | None = Field(None, description="training windows (like calibration:); default: the "
                                        "recipe's calibration windows")
    holdout_samples: int | None = Field(None, ge=0, description="windows kept out of training to measure KL "
                                        "before/after; default 10% (at least 1); 0: none")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the KL (loss scaled by T^2)")
    feature_loss_weight: float = Field(0.0, ge=0, description="weight of the hidden-state MSE on matched layers")
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer for the feature "
                                             "loss; default: every student layer, matched by relative depth")
    ce_weight: float = Field(0.0, ge=0, description="weight of the next-token cross entropy on the data")
    lr: float = Field(1e-5, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (matrices only)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final learning rate as a fraction of lr")
    micro_batch_size: int = Field(1, gt=0, description="windows per forward/backward")
    grad_accum: int = Field(1, gt=0, description="micro batches per optimizer step")
    steps: int | None = Field(None, ge=0, description="optimizer steps (with epochs: whichever ends first)")
    epochs: int | None = Field(None, ge=0, description="passes over the training windows")
    max_minutes: float | None = Field(None, gt=0, description="wall budget: stop cleanly (checkpointed) when hit")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm; null: no clipping")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    checkpoint_every: int = Field(50, ge=0, description="save a resumable checkpoint every N steps; 0: never")
    log_every: int = Field(10, ge=0, description="log a line every N steps")
    keep_sparsity: bool = Field(True, description="weights pruned to zero stay zero")
    freeze: list[str] = Field(default_factory=list, description="fnmatch patterns of parameter names kept "
                              "frozen, e.g. ['model.embed_tokens.*', '*norm*']")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if not self.steps and not self.epochs:
            raise ValueError("steps and epochs are both 0 or missing: set steps (optimizer steps) or epochs")
        if self.layer_map is not None and not self.feature_loss_weight:
            raise ValueError("layer_map is only used by the feature loss: set feature_loss_weight > 0")
        if self.layer_map is not None and any(k < 0 or v < 0 for k, v in self.layer_map.items()):
            raise ValueError("layer_map: layer indices are >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        return self

    def trajectory(self) -> dict:
        """The fields that decide the trained weights (the checkpoint key): not budgets, logging or device."""
        return self.model_dump(mode="json", exclude={"max_minutes", "checkpoint_every", "log_every", "device"})


def _state_hash(model) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's state (any dtype, fp8 included)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _load_teacher(handle, cfg: DistillConfig):
    from compressor.model import load_model
    from compressor.recipe import ModelSpec

    # The handle keeps what was loaded (an asset's or hub snapshot's folder, a .gguf); a model class from
    # remote code means the recipe allowed it.
    trust = type(handle.model).__module__.startswith("transformers_modules")
    return load_model(ModelSpec(source=cfg.teacher or handle.path, dtype="float32", trust_remote_code=trust))


def _windows(handle, cfg: DistillConfig, ctx):
    if cfg.train_data is not None:
        from compressor.calibration.data import calibration_windows

        d = cfg.train_data
        ctx_len = getattr(handle.config, "max_position_embeddings", None)
        if ctx_len and d.seq_len > ctx_len:
            raise PassError(NAME, [], f"train_data.seq_len {d.seq_len} is beyond the model's context of {ctx_len}",
                            exit_code=2)
        return calibration_windows(handle.tokenizer, d.source, d.num_samples, d.seq_len, d.seed, d.text_field,
                                   d.split), "train_data"
    if ctx.calibration is None:
        raise PassError(NAME, [], "no training data: set train_data or add a `calibration:` section", exit_code=2)
    return ctx.calibration(), "calibration"


def _sparsity_masks(model, wrappers) -> dict:
    """{parameter: keep mask} for the block Linear weights whose zeros must stay zero.

    With the prune pass's record ({layer: pattern} as `model._compressor_sparsity` or, surviving the stage cache,
    `config.compressor_sparsity`): the zeros of the layers it names, float or quantized (a quantized layer's
    other zero codes are then held too: they cannot be told apart from pruned ones). Without a record: the exact
    zeros of float Linear weights (a dense float weight has none); quantized layers are left free, since zeros on
    their grid are rounding, not pruning."""
    from torch import nn

    from compressor.calibration.forward_loop import decoder_blocks

    record = getattr(model, "_compressor_sparsity", None) or getattr(model.config, "compressor_sparsity", None)
    try:
        blocks = decoder_blocks(model)
        prefix = next(n for n, mod in model.named_modules() if mod is blocks) + "."
    except (TypeError, StopIteration):
        prefix = ""
    layers = {n: m for n, m in model.named_modules()
              if (isinstance(m, nn.Linear) or n in wrappers) and n.startswith(prefix)}
    named = (set(record) if isinstance(record, dict) else set()) & set(layers)
    masks = {}
    for n, mod in layers.items():
        if (named and n not in named) or (not record and n in wrappers):
            continue
        zero = mod.weight.detach() == 0
        if bool(zero.any()):
            masks[mod.weight] = ~zero
    return masks


def _prepare_student(model, cfg: DistillConfig):
    """QuantLinears swapped for trainable shadows, every float parameter in float32, the trainable ones (not
    frozen) requiring gradients. -> (QAT wrappers, sparsity masks, {name: trainable parameter}, original dtypes)."""
    import torch

    from compressor.passes.distill import _qat

    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    wrappers = _qat.wrap(model)
    masks = _sparsity_masks(model, wrappers) if cfg.keep_sparsity else {}
    params = {}
    for name, p in model.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32)
            if not any(fnmatch.fnmatchcase(name, pat) for pat in cfg.freeze):
                params[name] = p.requires_grad_(True)
    if not params:
        _restore_student(model, wrappers, dtypes)
        raise PassError(NAME, [], f"freeze {cfg.freeze} leaves no parameter to train", exit_code=2)
    return wrappers, masks, params, dtypes


def _restore_student(model, wrappers, dtypes: dict) -> None:
    """Shadows re-packed into their QuantLinears; parameters frozen again in their original dtypes; eval mode."""
    from compressor.passes.distill import _qat

    model.eval()
    _qat.unwrap(model, wrappers)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        p.grad = None
        if name in dtypes:
            p.data = p.data.to(dtypes[name])


def _heldout_kl(student, teacher, windows, mb: int, device) -> float | None:
    import torch

    from compressor.passes.distill._losses import kd_kl

    if not len(windows):
        return None
    student.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), mb):
            ids = windows[i:i + mb].to(device)
            s = student(input_ids=ids, use_cache=False).logits
            t = teacher(input_ids=ids, use_cache=False).logits
            total += float(kd_kl(s, t, 1.0)) * len(ids)
    return total / len(windows)


def _layer_map(cfg: DistillConfig, student, teacher) -> dict[int, int] | None:
    from compressor.calibration.forward_loop import decoder_blocks
    from compressor.passes.distill._losses import default_layer_map

    if not cfg.feature_loss_weight:
        return None
    ns, nt = len(decoder_blocks(student)), len(decoder_blocks(teacher))
    lm = dict(cfg.layer_map) if cfg.layer_map is not None else default_layer_map(ns, nt)
    for i, j in lm.items():
        if i >= ns or j >= nt:
            raise PassError(NAME, [], f"layer_map {i}: {j} is out of range (student has {ns} layers, teacher {nt})",
                            exit_code=2)
    hs, ht = student.config.hidden_size, teacher.config.hidden_size
    if hs != ht:
        raise PassError(NAME, [], f"feature loss needs equal hidden sizes (student {hs}, teacher {ht}); "
                        "set feature_loss_weight: 0", exit_code=2)
    return lm


def _steps(cfg: DistillConfig, n_train: int) -> int:
    per_epoch = math.ceil(n_train / (cfg.micro_batch_size * cfg.grad_accum))
    options = [s for s in (cfg.steps, cfg.epochs and cfg.epochs * per_epoch) if s]
    return min(options)


@register_pass(NAME, config=DistillConfig, consumes=Artifact.TORCH_MODEL, produces=Artifact.TORCH_MODEL,
               needs_calibration=lambda c: c.train_data is None, memory_factor=5.0)
def run(handle, cfg: DistillConfig, ctx) -> PassResult:
    import torch

    from compressor.cache import key_of, sha256_tensor
    from compressor.passes.distill._losses import distill_loss
    from compressor.passes.distill._trainer import Checkpoints, Schedule, train

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PassError(NAME, [], "device: cuda, but CUDA is not available", exit_code=2)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    windows, data_from = _windows(handle, cfg, ctx)
    n = len(windows)
    k = cfg.holdout_samples if cfg.holdout_samples is not None else (max(1, round(0.1 * n)) if n > 1 else 0)
    if k >= n:
        raise PassError(NAME, [], f"holdout_samples {k} leaves no training windows of {n}", exit_code=2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))
    held, train_w = windows[order[:k]], windows[order[k:]]
    total_steps = _steps(cfg, len(train_w))

    model = handle.model
    student_hash = _state_hash(model)
    teacher = _load_teacher(handle, cfg)
    if teacher.config.vocab_size != model.config.vocab_size:
        raise PassError(NAME, [], f"teacher vocabulary {teacher.config.vocab_size} differs from the student's "
                        f"{model.config.vocab_size}", exit_code=2)
    layer_map = _layer_map(cfg, model, teacher.model)
    ckpt = None
    if ctx.cache_enabled:
        key = key_of("distill-checkpoint", 1, cfg.trajectory(), student_hash, teacher.fingerprint,
                     sha256_tensor(windows), ctx.seed)
        ckpt = Checkpoints(ctx.cache_dir / "distill-checkpoints" / key)

    home = next(iter(model.parameters())).device
    wrappers, masks, params, dtypes = _prepare_student(model, cfg)
    model.to(device)
    tmodel = teacher.model.to(device).eval()
    masks = {p: m.to(device) for p, m in masks.items()}

    def mask_fn() -> None:
        for p, m in masks.items():
            p.data.mul_(m)
            if p.grad is not None:
                p.grad.mul_(m)

    feats = layer_map is not None

    def loss_fn(ids):
        with torch.no_grad():
            t_out = tmodel(input_ids=ids, use_cache=False, output_hidden_states=feats)
        s_out = model(input_ids=ids, use_cache=False, output_hidden_states=feats)
        return distill_loss(s_out, t_out, ids, cfg.temperature, cfg.feature_loss_weight, layer_map, cfg.ce_weight)

    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    sch = Schedule(total_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.micro_batch_size,
                   cfg.grad_accum, cfg.max_grad_norm, ctx.seed, cfg.checkpoint_every, cfg.log_every, cfg.max_minutes)
    mb = cfg.micro_batch_size
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        state = {"heldout_kl_before": _heldout_kl(model, tmodel, held, mb, device)}
        model.train()
        res = train(params, loss_fn, train_w, sch, opt, ckpt, ctx, state, mask_fn if masks else None, device)
    _restore_student(model, wrappers, dtypes)
    kl_after = _heldout_kl(model, tmodel, held, mb, device)
    model.to(home)
    teacher = tmodel = opt = None  # free the teacher and the optimizer state before evaluation
    if device.type == "cuda":
        torch.cuda.empty_cache()

    st = res.state
    notes = []
    if res.stopped:
        notes.append(f"distill stopped by max_minutes at step {res.steps_done} of {total_steps}; raise or remove "
                     "max_minutes to continue from the checkpoint")
    elif ckpt is not None:
        ckpt.remove()
    info = {
        "device": device.type, "steps": res.steps_done, "total_steps": total_steps,
        "steps_this_run": res.steps_done - res.start_step, "resumed": res.start_step > 0,
        "resumed_from_step": res.start_step, "stopped_early": res.stopped, "tokens": st.get("tokens", 0),
        "train_windows": len(train_w), "heldout_windows": len(held), "seq_len": int(windows.shape[1]),
        "data": data_from, "teacher": cfg.teacher or handle.path,
        "loss_start": st.get("loss_start"), "loss_end": st.get("loss_end"),
        "heldout_kl_before": st.get("heldout_kl_before"), "heldout_kl_after": kl_after,
        "minutes": round(res.seconds / 60, 3), "minutes_total": round(st.get("minutes", 0.0), 3),
        "qat_layers": len(wrappers), "sparsity_masked_layers": len(masks),
        "zeros_kept": int(sum(int((~m).sum()) for m in masks.values())),
        "feature_layer_map": layer_map, "checkpoints": ("disabled (--no-cache)" if ckpt is None else
                                                        "kept (stopped early)" if res.stopped else "removed"),
        "notes": notes,
    }
    ctx.logger.info("distill: %d steps on %s (%s), loss %.4g -> %.4g, held-out KL %s -> %s%s", res.steps_done,
                    device.type, data_from, st.get("loss_start") or float("nan"), st.get("loss_end") or float("nan"),
                    _fmt(st.get("heldout_kl_before")), _fmt(kl_after),
                    f", resumed from step {res.start_step}" if res.start_step else "")
    return PassResult(info=info)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.5g}"
