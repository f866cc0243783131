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


# ---------------------------------------------------------------------------------------------------------
# Cached statistics: a block's input statistics are a function of the calibration tokens, the model's state
# up to that block (embeddings, config, and every earlier block as it is when this block is calibrated, i.e.
# already quantized in a layer-sequential pass) and the block's own weights. Keyed by exactly that, a second
# run over the same inputs (another sweep variant, a rerun with --overwrite, another pass reading the same
# statistics) loads them instead of pushing every calibration batch through the block again. Variants that
# quantize differently share the statistics of the blocks before their first difference (block 0 at least).

STATS_VERSION = 1


def _module_hash(module: torch.nn.Module) -> str:
    from compressor.calibration.stats import state_hash

    return state_hash(module)


class StatsCache:
    """Per-block InputStats through the content-addressed cache.

        sc = StatsCache(model, batches, ctx.cache_dir, ctx.cache_enabled)
        def work(i, block, run_block):
            stats, reused = sc.collect(i, block, layers, run_block)   # instead of `with collect(layers): run_block()`
    """

    def __init__(self, model, batches: torch.Tensor, cache_dir, enabled: bool = True, kind: str = "input-stats"):
        from compressor.cache import Cache, key_of, sha256_tensor
        from compressor.calibration.forward_loop import decoder_blocks

        self.cache = Cache(cache_dir, enabled) if cache_dir is not None else None
        self.kind = kind
        self.blocks = decoder_blocks(model)
        self.hits = self.misses = 0
        if self.cache is None or not self.cache.enabled:
            return
        block_params = {id(t) for t in self.blocks.state_dict(keep_vars=True).values()}
        outside = {k: t for k, t in model.state_dict(keep_vars=True).items() if id(t) not in block_params}
        h = key_of(sorted((k, tuple(t.shape), str(t.dtype)) for k, t in outside.items()))
        for k in sorted(outside):
            h = key_of(h, k, sha256_tensor(_plain(outside[k].detach().cpu())))
        cfg = model.config.to_dict() if hasattr(model, "config") else {}
        # chain[j]: everything that determines block j's inputs.
        self.chain = [key_of("block-inputs", STATS_VERSION, sha256_tensor(batches), h, cfg)]

    def key(self, i: int, layers: list[str]) -> str:
        """Key of block i's statistics; blocks before i are hashed as they are now (call in block order)."""
        from compressor.cache import key_of

        while len(self.chain) <= i:
            j = len(self.chain) - 1
            self.chain.append(key_of(self.chain[j], _module_hash(self.blocks[j])))
        return key_of(self.kind, self.chain[i], _module_hash(self.blocks[i]), sorted(layers))

    def collect(self, i: int, block, layers: list[tuple[str, torch.nn.Module]], run_block) -> tuple[dict, bool]:
        """{layer name: InputStats} of block i's layers (shared objects where inputs are shared) -> (stats, reused)."""
        import time

        names = [n for n, _ in layers]
        key = self.key(i, names) if self.cache is not None and self.cache.enabled else None
        hit = self.cache.get(self.kind, key) if key else None
        if hit is not None:
            self.hits += 1
            return _load(hit), True
        t0 = time.perf_counter()
        with collect(layers) as stats:
            run_block()
        self.misses += 1
        if key:
            self.cache.put(self.kind, key, lambda d: _save(stats, d), seconds=time.perf_counter() - t0)
        return stats, False


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A tensor numpy can hash (fp8 / bf16 viewed as integers)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def _save(stats: dict[str, InputStats], folder) -> None:
    import json

    from safetensors.torch import save_file

    objs: list[InputStats] = []
    index = {}
    for name, st in stats.items():
        if not any(st is o for o in objs):
            objs.append(st)
        index[name] = next(k for k, o in enumerate(objs) if o is st)
    tensors = {}
    for k, st in enumerate(objs):
        if st.xtx is not None:
            tensors[f"{k}.xtx"], tensors[f"{k}.abs_sum"] = st.xtx.contiguous(), st.abs_sum.contiguous()
    save_file(tensors, str(folder / "stats.safetensors"))
    (folder / "index.json").write_text(json.dumps({"layers": index, "n": [o.n for o in objs]}))


def _load(folder) -> dict[str, InputStats]:
    import json

    from safetensors.torch import load_file

    meta = json.loads((folder / "index.json").read_text())
    tensors = load_file(str(folder / "stats.safetensors"))
    objs = []
    for k, n in enumerate(meta["n"]):
        st = InputStats()
        st.n, st.xtx, st.abs_sum = n, tensors.get(f"{k}.xtx"), tensors.get(f"{k}.abs_sum")
        objs.append(st)
    return {name: objs[k] for name, k in meta["layers"].items()}
