"""Activation observers: turn the values a tensor took during calibration into a quantization scale.

    minmax      scale from the largest |x| seen
    percentile  scale from the p-th percentile of |x| (per batch, averaged): ignores rare outliers
    mse         scale from the clipping range that minimises the quantize-dequantize squared error on a
                sample of the values seen (MSE-optimal clipping)
Each observer is fed batches with `update(x)` and gives `scale(fmt)` for fmt int8 (symmetric, 127) or fp8
(E4M3, 448). Per-tensor only: per-token scales are dynamic and need no observer.
"""

from __future__ import annotations

import torch

from compressor.kernels.fakequant import FP8_MAX, fake_quant

_QMAX = {"int8": 127.0, "fp8": FP8_MAX}
_SAMPLE = 1 << 18  # values kept per tensor for the MSE search
_QUANTILE_MAX = 1 << 24  # torch.quantile's input limit


class Observer:
    def __init__(self) -> None:
        self.amax = torch.zeros(())
        self.count = 0  # values seen

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.amax = torch.maximum(self.amax, x.abs().amax().to(torch.float32))
        self.count += x.numel()

    def range(self, fmt: str) -> torch.Tensor:
        return self.amax

    def scale(self, fmt: str) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("observer saw no values")
        return (self.range(fmt).clamp_min(1e-12) / _QMAX[fmt]).reshape(1)


class MinMaxObserver(Observer):
    pass


class PercentileObserver(Observer):
    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        self.q = percentile / 100.0
        self.sum, self.batches = 0.0, 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        a = x.detach().abs().reshape(-1).to(torch.float32)
        if a.numel() > _QUANTILE_MAX:
            a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[:_QUANTILE_MAX]]
        self.sum += float(torch.quantile(a, self.q))
        self.batches += 1

    def range(self, fmt: str) -> torch.Tensor:
        return torch.tensor(self.sum / max(self.batches, 1))


class MSEObserver(Observer):
    def __init__(self, grid: int = 40, min_ratio: float = 0.2) -> None:
        super().__init__()
        self.grid, self.min_ratio = grid, min_ratio
        self.sample: list[torch.Tensor] = []
        self.kept = 0
        self.gen = torch.Generator().manual_seed(0)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        flat = x.detach().reshape(-1).to(torch.float32)
        take = min(flat.numel(), max(_SAMPLE // 16, _SAMPLE - self.kept))
        idx = torch.randint(0, flat.numel(), (take,), generator=self.gen)
        self.sample.append(flat[idx])
        self.kept += take

    def range(self, fmt: str) -> torch.Tensor:
        v = torch.cat(self.sample)
        best, best_err = self.amax, float("inf")
        for r in torch.linspace(1.0, self.min_ratio, self.grid).tolist():
            s = (self.amax * r).clamp_min(1e-12) / _QMAX[fmt]
            err = float((fake_quant(v, fmt, s) - v).pow(2).mean())
            if err < best_err:
                best, best_err = self.amax * r, err
        return best


def make_observer(kind: str, percentile: float = 99.99) -> Observer:
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    if kind == "mse":
        return MSEObserver()
    raise ValueError(f"unknown observer {kind!r} (minmax, percentile, mse)")
