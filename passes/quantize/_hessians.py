"""Collect each Linear layer's input Hessian H = X^T X / n (and mean |X| per channel) while a block runs.

Layers that read the same input tensor (q/k/v, gate/up) share one accumulation instead of computing it once
per layer. Accumulation is float32 per batch, summed in float64.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from compressor.calibration.stats import NonFiniteActivation


class InputStats:
    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self.xtx is None:
            self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            self.abs_sum = torch.zeros(x.shape[1], dtype=torch.float64)
        self.xtx += (x.T @ x).to(torch.float64)
        self.abs_sum += x.abs().sum(0).to(torch.float64)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """Mean of 2 x^T x (GPTQ's convention); proportional to the summed output error's quadratic form."""
        return 2.0 * self.xtx / max(self.n, 1)

    @property
    def x_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).to(torch.float32)


@contextmanager
def collect(layers: list[tuple[str, torch.nn.Module]]):
    """Yields {name: InputStats}; layers fed the same tensor share one InputStats object."""
    stats: dict[str, InputStats] = {}
    last: dict = {"x": None, "stats": None}
    handles = []

    def hook_for(name):
        def hook(mod, args):
            x = args[0]
            if x.numel() == 0:
                return
            if last["x"] is x and name not in stats:
                stats[name] = last["stats"]  # same tensor as the previous layer: share
                return
            if last["x"] is x and stats.get(name) is last["stats"]:
                return  # shared accumulation already counted this tensor
            if not torch.isfinite(x).all():
                raise NonFiniteActivation(name)
            st = stats.setdefault(name, InputStats())
            st.add(x.detach())
            last["x"], last["stats"] = x, st
        return hook

    for name, mod in layers:
        handles.append(mod.register_forward_pre_hook(hook_for(name)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
