"""Calibration statistics: push the calibration batches through the model with hooks on chosen Linear layers.

- `input_channel_absmax`: per input channel max |x| of each layer's input (SmoothQuant's statistic). Cached by
  content hash (model weights + calibration tokens + layer names), so variants that share a model state and
  calibration set (another alpha, int8 vs fp8 activations) reuse it instead of recomputing.
- `calibrate_input_scales`: static per-tensor activation scales for QuantLinear inputs, from an observer.
Activations that turn NaN/Inf stop the run, naming the first layer whose input is not finite.
An MoE expert that received no calibration tokens gets the largest scale of its sibling experts (never an
unset scale, never NaN), and is listed.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch

from compressor.cache import Cache, key_of, sha256_tensor


class NonFiniteActivation(RuntimeError):
    def __init__(self, layer: str):
        super().__init__(f"calibration activations turned NaN/Inf at the input of {layer}")
        self.layer = layer


def state_hash(model) -> str:
    """Content hash of everything in the model's state (weights, scales, buffers)."""
    from compressor.checkpoint_io import unique_state_dict

    h = hashlib.sha256()
    for k, t in sorted(unique_state_dict(model).items()):
        h.update(k.encode())
        t = t.detach().cpu()
        if t.dtype in (torch.float8_e4m3fn, torch.bfloat16):
            t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int16)
        h.update(sha256_tensor(t).encode())
    return h.hexdigest()


@contextmanager
def input_hooks(model, names: list[str], fn):
    """fn(name, x) on the input of each named module, for the duration of the block."""
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, args, n=name: fn(n, args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_batches(model, batches: torch.Tensor, progress=None, desc: str = "calibrate") -> None:
    rows = batches if progress is None else progress(batches, total=len(batches), desc=desc, unit="sample")
    for row in rows:
        model(input_ids=row[None], use_cache=False)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteActivation(name)


def input_channel_absmax(model, batches: torch.Tensor, names: list[str], cache_dir: Path | None = None,
                         cache_enabled: bool = True, progress=None, logger=None) -> dict[str, torch.Tensor]:
    """{layer name: (in_features,) float32 max |x| per input channel} over the calibration batches."""
    from safetensors.torch import load_file, save_file

    cache = Cache(cache_dir, cache_enabled) if cache_dir is not None else None
    key = key_of("channel_absmax", state_hash(model), sha256_tensor(batches), sorted(names)) if cache else None
    if cache is not None:
        hit = cache.get("calib-stats", key)
        if hit is not None:
            if logger:
                logger.info("calibration statistics reused from the cache (%s)", key[:12])
            return load_file(str(hit / "absmax.safetensors"))
    stats: dict[str, torch.Tensor] = {}

    def observe(name, x):
        _check_finite(name, x)
        a = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).to(torch.float32)
        stats[name] = a if name not in stats else torch.maximum(stats[name], a)

    with input_hooks(model, names, observe):
        run_batches(model, batches, progress, "calibration statistics")
    if cache is not None and cache.enabled:
        cache.put("calib-stats", key, lambda d: save_file({k: v.contiguous() for k, v in stats.items()},
                                                            str(d / "absmax.safetensors")))
    return stats


def calibrate_input_scales(model, batches: torch.Tensor, modules: dict, observer: str, percentile: float = 99.99,
                           progress=None) -> dict:
    """Set `input_scale` of each QuantLinear in `modules` ({name: module}, static activation schemes) from an
    observer over the calibration batches. Activations are observed unquantized (weights already quantized).
    Returns {"no_tokens": [...], "fallback": {name: sibling source}}."""
    from compressor.calibration.observers import make_observer
    from compressor.moe import siblings

    obs = {n: make_observer(observer, percentile) for n in modules}

    def observe(name, x):
        _check_finite(name, x)
        if x.numel():
            obs[name].update(x)

    saved = {n: m.activations for n, m in modules.items()}
    for m in modules.values():
        m.activations = None  # observe the float inputs; quantization is switched back on below
    try:
        with input_hooks(model, list(modules), observe):
            run_batches(model, batches, progress, "activation scales")
    finally:
        for n, m in modules.items():
            m.activations = saved[n]
    empty = [n for n, o in obs.items() if o.count == 0]
    fallback = {}
    for name, m in modules.items():
        fmt = m.activations["format"]
        if name in empty:
            sib = [s for s in siblings(name, modules) if s not in empty]
            if not sib:
                raise ValueError(f"layer {name} received no calibration tokens and has no calibrated sibling "
                                 "expert to borrow a scale from; give more calibration data")
            src = max(sib, key=lambda s: float(obs[s].scale(fmt)))
            scale = obs[src].scale(fmt)
            fallback[name] = src
        else:
            scale = obs[name].scale(fmt)
        m.input_scale.copy_(scale)
    return {"no_tokens": empty, "fallback": fallback}
