from __future__ import annotations

import torch

from compressor.calibration.forward_loop import capture_block_inputs, decoder_blocks, layer_sequential
from compressor.model import load_model
from compressor.recipe import ModelSpec


def test_layer_sequential_reproduces_the_models_hidden_states(tiny_model_dir):
    """With no change to the blocks, the activations advanced block by block equal the model's own."""
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    batches = torch.randint(0, h.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    seen = []

    def work(i, block, run_block):
        calls = []
        hook = block.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
        run_block()
        hook.remove()
        seen.append((i, calls))

    captured = capture_block_inputs(h.model, batches)
    assert len(captured) == 3 and captured[0][0].shape == (1, 20, 64)
    layer_sequential(h.model, batches, work)
    assert [i for i, _ in seen] == [0, 1] and all(len(c) == 3 for _, c in seen)

    # Advance once more by hand and compare with output_hidden_states of the full model.
    blocks = decoder_blocks(h.model)
    with torch.no_grad():
        for row, (hidden, kw) in zip(batches, captured):
            for b in blocks:
                out = b(hidden, **kw)
                hidden = out[0] if isinstance(out, tuple) else out
            ref = h.model(input_ids=row[None], output_hidden_states=True).hidden_states
            # hidden_states[-1] has the final norm applied; the pre-norm output is the norm's input.
            torch.testing.assert_close(h.model.model.norm(hidden), ref[-1])
