"""GPTQ for a streamed run: layer-sequential calibration with one decoder block in memory at a time.

The calibration windows are pushed through the embedding once (calibration.forward_loop.capture_block_inputs,
one window at a time) into an `ActivationStore`: in memory when small, else a file in the run's temporary
folder read and written one window at a time. For each block, as quantize_gptq does in memory: every window
runs through the block while hooks gather the Linears' Hessians (passes/quantize/_hessians.py), each Linear is
quantized by passes/quantize/_gptq_math.py, and the windows' outputs computed with the quantized weights
replace the inputs for the next block. The arithmetic is the in-memory pass's, so the result is the same
tensor for tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

from compressor import stream_plan
from compressor.errors import InputError, PassError

NAME = "quantize_gptq"


class ActivationStore:
    """N rows of (1, L, H) hidden states: a list in memory, or a file with one row read or written at a time."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype, folder: Path | None):
        import torch

        self.n, self.shape, self.dtype = n, tuple(shape), dtype
        self.row_bytes = torch.empty(shape, dtype=dtype, device="meta").numel() * dtype.itemsize
        self.rows = None if folder is not None else [None] * n
        self.fd = None
        if folder is not None:
            self.path = Path(folder) / "activations.bin"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def on_disk(self) -> bool:
        return self.fd is not None

    def put(self, i: int, t) -> None:
        import torch

        if self.rows is not None:
            self.rows[i] = t
            return
        buf = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            if os.pwrite(self.fd, buf, i * self.row_bytes) != self.row_bytes:
                raise OSError(f"short write to {self.path}")
        except OSError as e:
            from compressor.stream_io import disk_full, raise_disk_full

            if disk_full(e):
                raise_disk_full(e, self.path)
            raise

    def get(self, i: int):
        import torch

        if self.rows is not None:
            return self.rows[i]
        buf = torch.empty(self.row_bytes, dtype=torch.uint8)
        if os.preadv(self.fd, [buf.numpy()], i * self.row_bytes) != self.row_bytes:
            raise OSError(f"short read from {self.path}")
        return buf.view(self.dtype).reshape(self.shape)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.path.unlink(missing_ok=True)


class StreamGPTQ:
    """`start` embeds the calibration windows; `work(name, unit, is_block)` GPTQs one block in place and
    advances the windows; `summary()` is the pass's report info."""

    def __init__(self, model, tokenizer, recipe, transform, scratch: Path, ctx):
        from compressor.calibration.data import calibration_windows
        from compressor.passes.quantize._layers import select_layers, split_ragged

        self.model, self.cfg, self.ctx, self.scratch = model, transform.config, ctx, scratch
        c = recipe.calibration
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and c.seq_len > limit:
            raise InputError(f"{recipe.path}: calibration.seq_len {c.seq_len} is beyond the model's context of "
                             f"{limit} tokens")
        self.batches = calibration_windows(tokenizer, c.source, c.num_samples, c.seq_len, c.seed, c.text_field,
                                           c.split)
        layers = select_layers(model, self.cfg.ignore)
        # Ragged widths are refused (or skipped) for the whole model before any weight is read, as in memory.
        _, self.skipped = split_ragged(NAME, layers, self.cfg.group_size, self.cfg.ragged)
        self.pruned = getattr(model.config, "compressor_sparsity", None) or {}
        self.stats: dict[str, dict] = {}
        self.store, self.kw = None, None

    def start(self, mat, units: list) -> None:
        """Materialize what precedes the first block (the embedding), capture every window's block-0 input."""
        from compressor.calibration.forward_loop import capture_block_inputs

        before = []
        for name, unit in units:
            if name.split(".")[-1].isdigit():
                break
            mat.load(name, unit)
            before.append(unit)
        self._computed_buffers()
        rows = self.batches
        for i in range(rows.shape[0]):
            ((hidden, kw),) = capture_block_inputs(self.model, rows[i:i + 1])
            if self.store is None:
                big = rows.shape[0] * hidden.numel() * hidden.element_size() > stream_plan.ACTIVATIONS_IN_MEMORY
                self.store = ActivationStore(rows.shape[0], hidden.shape, hidden.dtype, self.scratch if big else None)
                self.kw = kw  # the same positions (and rotary tables) for every window of this length
            self.store.put(i, hidden)
        for unit in before:
            mat.drop(unit)
        self.on_disk = self.store.on_disk

    def _computed_buffers(self) -> None:
        """Modules outside the blocks whose only state is computed at construction (rotary tables) are rebuilt
        on the CPU from the config: the meta model has none of their values."""
        for name, m in list(self.model.named_modules()):
            if name and any(b.is_meta for b in m.buffers(recurse=False)) and not any(
                    True for _ in m.parameters(recurse=False)):
                try:
                    self.model.set_submodule(name, type(m)(config=self.model.config))
                except TypeError as e:
                    raise InputError(f"{name}: cannot rebuild {type(m).__name__} for calibration ({e})") from None

    def work(self, name: str, block, is_block: bool):
        import torch

        if is_block:
            with torch.no_grad():  # as layer_sequential
                self._block(name, block)
        return block

    def _block(self, name: str, block) -> None:
        import torch

        from compressor.calibration.stats import NonFiniteActivation
        from compressor.passes.quantize import _rtn_math as m
        from compressor.passes.quantize._gptq_math import HessianNotPositiveDefinite, gptq_quantize
        from compressor.passes.quantize._hessians import collect
        from compressor.passes.quantize._layers import install_quantized, select_layers

        cfg, n = self.cfg, self.store.n
        layers = [(ln, lin) for ln, lin in select_layers(block, cfg.ignore, prefix=name) if ln not in self.skipped]
        act = cfg.activations.scheme if cfg.activations else None
        try:
            with collect(layers) as hstats:  # q/k/v and gate/up share one Hessian
                for i in range(n):
                    block(self.store.get(i), **self.kw)
        except NonFiniteActivation as e:
            raise PassError(NAME, [], str(e)) from None
        users: dict[int, int] = {}
        for ln, _ in layers:
            users[id(hstats.get(ln))] = users.get(id(hstats.get(ln)), 0) + 1
        while layers:  # popped, so each float Linear (swapped out of the block) is freed after its turn
            ln, lin = layers.pop(0)
            st = hstats.pop(ln, None)
            if st is None or st.n == 0:
                raise PassError(NAME, [], f"{ln} received no calibration tokens")
            h = st.hessian
            users[id(st)] -= 1
            if not users[id(st)]:  # its last layer: free X^T X before GPTQ's own float64 copies of H
                st.xtx = None
            del st
            mask = lin.weight.data != 0 if ln in self.pruned else None  # pruned weights stay exactly zero
            try:
                r = gptq_quantize(lin.weight.data, h, cfg.bits, cfg.group_size, cfg.symmetric,
                                  cfg.dampening_frac, cfg.block_size, cfg.act_order, cfg.max_damp_retries,
                                  cfg.observer, mask)
            except HessianNotPositiveDefinite as e:
                raise PassError(NAME, [], f"{ln}: Hessian not positive definite after {cfg.max_damp_retries} "
                                f"retries ({e}); raise dampening_frac (now {cfg.dampening_frac})") from None
            del h
            ql = install_quantized(self.model, ln, lin, r.quantized, cfg.format, cfg.group_size, cfg.symmetric, 0, act)
            deq = ql.dequantized_weight()
            if not torch.isfinite(deq).all():
                raise PassError(NAME, [], f"{ln}: dequantized weight has NaN/Inf")
            self.stats[ln] = {"sqnr_db": round(m.sqnr_db(lin.weight.data, deq), 3), "dampening": r.dampening,
                              "retries": r.retries}
            del lin, deq, r, ql  # not beside the next layer's GPTQ
        for i in range(n):  # the next block's inputs, from this block's quantized weights
            out = block(self.store.get(i), **self.kw)
            self.store.put(i, out[0] if isinstance(out, tuple) else out)

    def summary(self) -> dict:
        if self.store is not None:
            self.store.close()
        vals = sorted(s["sqnr_db"] for s in self.stats.values())
        return {"layers_quantized": len(self.stats), "layers_skipped_ragged": self.skipped,
                "sqnr_db_min": vals[0], "sqnr_db_median": vals[len(vals) // 2],
                "calibration_tokens": int(self.batches.numel()), "activations_on_disk": self.on_disk,
                "dampening_retries": {n: {"dampening": s["dampening"], "retries": s["retries"]}
                                      for n, s in self.stats.items() if s["retries"]},
                "sqnr_db": {n: s["sqnr_db"] for n, s in self.stats.items()}}
