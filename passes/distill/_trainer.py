"""The distillation training loop: AdamW, warmup + cosine/linear decay, gradient accumulation, clipping, a wall
budget, and checkpoints that let an interrupted run continue where it stopped with the same final weights.

Determinism: the windows of step s and the learning rate of step s are functions of (seed, s) alone, and a
checkpoint holds every trainable tensor and the optimizer's state exactly (float32, no rounding), so a run that
resumes from step k reaches the weights of a run that never stopped (bit for bit on the same device).

Checkpoint folder (one per run key): weights-<step>.safetensors, optim-<step>.pt (torch.save of the optimizer's
state dict, read back with weights_only=True), state.json (step, losses, counters; names the two files). Each
file is written to a temporary name and renamed; state.json is written last, so a reader sees the previous
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


def lr_at(step: int, total: int, lr: float, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warmup over `warmup` steps to `lr`,
    then cosine or linear decay to min_ratio * lr at the last step (or constant)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total - warmup <= 1:
        return lr
    frac = (step - warmup) / (total - warmup - 1)  # 0 at the first step after warmup, 1 at the last step
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * frac))
    elif schedule == "linear":
        decay = 1.0 - frac
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return lr * (min_ratio + (1.0 - min_ratio) * decay)


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Window indices for optimizer step `step`: the training set is read in a seeded shuffled order, a fresh
    permutation every epoch, `batch` windows a step (a step may straddle two epochs)."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in torch.unique(pos // n).tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


class Checkpoints:
    """The checkpoint folder of one run key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def save(self, step: int, params: dict[str, torch.nn.Parameter], optimizer, state: dict) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        old = self._state()
        names = {"weights": f"weights-{step}.safetensors", "optim": f"optim-{step}.pt"}
        tmp = self.folder / f".weights-{step}.tmp"
        save_file({n: p.detach().to("cpu").contiguous() for n, p in params.items()}, str(tmp))
        os.replace(tmp, self.folder / names["weights"])
        tmp = self.folder / f".optim-{step}.tmp"
        torch.save(optimizer.state_dict(), tmp)
        os.replace(tmp, self.folder / names["optim"])
        tmp = self.folder / ".state.json.tmp"
        tmp.write_text(json.dumps({**state, "step": step, **names}, indent=1))
        os.replace(tmp, self.folder / "state.json")
        if old is not None and old["step"] != step:
            for k in ("weights", "optim"):
                (self.folder / old[k]).unlink(missing_ok=True)

    def _state(self) -> dict | None:
        f = self.folder / "state.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def load(self, params: dict[str, torch.nn.Parameter], optimizer) -> dict | None:
        """Restore the last checkpoint into `params` and `optimizer`; -> its state, or None when there is none
        (or it does not fit these parameters, which a changed model would cause)."""
        from safetensors.torch import load_file

        state = self._state()
        if state is None:
            return None
        weights = load_file(str(self.folder / state["weights"]))
        if set(weights) != set(params) or any(weights[n].shape != p.shape for n, p in params.items()):
            return None
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n].to(p.device, p.dtype))
        optimizer.load_state_dict(torch.load(self.folder / state["optim"], map_location="cpu", weights_only=True))
        return state

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Schedule:
    total_steps: int
    lr: float
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    max_minutes: float | None = None


@dataclass
class TrainResult:
    steps_done: int  # optimizer steps completed in total (this run and the runs it resumed)
    start_step: int  # where this run began (0 unless resumed)
    losses: list[float] = field(default_factory=list)  # this run's step losses
    state: dict = field(default_factory=dict)  # carried through checkpoints: loss_start, kl_before, ...
    stopped: str | None = None  # "max_minutes" when the wall budget ended the run early
    seconds: float = 0.0


def train(params: dict[str, torch.nn.Parameter], loss_fn: Callable, windows: torch.Tensor, sch: Schedule,
          optimizer, ckpt: Checkpoints | None, ctx, state: dict, mask_fn: Callable[[], None] | None = None,
          device="cpu") -> TrainResult:
    """Run optimizer steps until `sch.total_steps` (or the wall budget). loss_fn(ids (B, L)) -> (loss, parts).
    mask_fn() is called after the backward passes (to zero gradients) and after each update (to zero weights).
    `state` is the caller's record, saved with each checkpoint and replaced by the checkpoint's on resume."""
    start = 0
    if ckpt is not None:
        saved = ckpt.load(params, optimizer)
        if saved is not None:
            start, state = saved["step"], {k: v for k, v in saved.items() if k not in ("step", "weights", "optim")}
    res = TrainResult(start, start, state=state)
    batch = sch.micro_batch_size * sch.grad_accum
    plist = list(params.values())
    t0 = time.perf_counter()
    minutes_before = state.get("minutes", 0.0)  # spent by the runs this one resumes
    bar = ctx.progress(range(start, sch.total_steps), total=sch.total_steps - start, desc="distill", unit="step")
    try:
        for step in bar:
            torch.manual_seed(sch.seed * 1_000_003 + step)  # any sampling (dropout) depends on the step alone
            lr = lr_at(step, sch.total_steps, sch.lr, sch.warmup_steps, sch.schedule, sch.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            idx = batch_indices(step, len(windows), batch, sch.seed)
            loss_sum = 0.0
            for k in range(sch.grad_accum):
                ids = windows[idx[k * sch.micro_batch_size:(k + 1) * sch.micro_batch_size]].to(device)
                loss, _ = loss_fn(ids)
                (loss / sch.grad_accum).backward()
                loss_sum += float(loss.detach()) / sch.grad_accum
            if mask_fn is not None:
                mask_fn()
            if sch.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(plist, sch.max_grad_norm)
            optimizer.step()
            if mask_fn is not None:
                mask_fn()
            done = step + 1
            res.steps_done = done
            res.losses.append(loss_sum)
            state.setdefault("loss_start", loss_sum)
            state["loss_end"] = loss_sum
            state["tokens"] = state.get("tokens", 0) + int(batch * windows.shape[1])
            elapsed = time.perf_counter() - t0
            state["minutes"] = minutes_before + elapsed / 60
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum:.4g}", lr=f"{lr:.2e}", refresh=False)
            if sch.log_every and (done % sch.log_every == 0 or done == sch.total_steps):
                eta = elapsed / (done - start) * (sch.total_steps - done)
                ctx.logger.info("distill: step %d/%d loss %.5g lr %.3g (%.1f min, ETA %.1f min)", done,
                                sch.total_steps, loss_sum, lr, elapsed / 60, eta / 60)
            out_of_time = sch.max_minutes is not None and elapsed > sch.max_minutes * 60
            if ckpt is not None and done < sch.total_steps and (
                    out_of_time or (sch.checkpoint_every and done % sch.checkpoint_every == 0)):
                ckpt.save(done, params, optimizer, state)
            if out_of_time and done < sch.total_steps:
                res.stopped = "max_minutes"
                ctx.logger.warning("distill: wall budget of %g min reached at step %d of %d; stopping%s",
                                   sch.max_minutes, done, sch.total_steps,
                                   " (a rerun resumes from the checkpoint)" if ckpt is not None else "")
                break
    finally:
        if hasattr(bar, "close"):
            bar.close()
    res.seconds = time.perf_counter() - t0
    return res
