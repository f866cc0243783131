"""Layer-sequential calibration: capture the inputs of decoder block 0 once, then for each block i run the
caller's per-block work (collect statistics, quantize), and feed block i's outputs, computed with its
*quantized* weights, to block i+1. Peak memory is one block's work plus the cached activations
(N x L x hidden floats), never a second copy of the model.

    def work(index, block, run_block):
        ... register hooks, run_block() to push every calibration batch through the block, quantize ...
    layer_sequential(model, batches, work, progress)
"""

from __future__ import annotations

from typing import Callable

import torch


class _Captured(Exception):
    """Raised by the pre-hook on block 0 to stop the forward once its inputs are recorded."""


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (Llama-style `model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no `model.layers` ModuleList of decoder blocks found")
    return layers


@torch.no_grad()
def capture_block_inputs(model, batches: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """Run each batch (N, L) of token ids up to block 0 and record (hidden_states, kwargs) per batch."""
    blocks = decoder_blocks(model)
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
        captured.append((hidden.detach(), kw))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in batches:
            try:
                model(input_ids=row[None], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def layer_sequential(model, batches: torch.Tensor, work: Callable, progress=None) -> None:
    """For each block: `work(index, block, run_block)`; then advance the cached activations through the block
    as it is after `work` (quantized). `run_block()` pushes every cached batch through the block (outputs
    discarded) so the caller's hooks see real inputs."""
    blocks = decoder_blocks(model)
    cached = capture_block_inputs(model, batches)

    def run_block(block):
        for hidden, kw in cached:
            block(hidden, **kw)

    it = range(len(blocks))
    if progress is not None:
        it = progress(it, total=len(blocks), desc="calibrate", unit="block")
    for i in it:
        block = blocks[i]
        work(i, block, lambda b=block: run_block(b))
        for j, (hidden, kw) in enumerate(cached):
            out = block(hidden, **kw)
            cached[j] = (out[0] if isinstance(out, tuple) else out, kw)
