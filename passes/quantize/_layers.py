"""Plumbing shared by the weight-quantization passes: choosing layers, checking group sizes, swapping in
QuantLinear modules. (Math lives in _rtn_math / _gptq_math.)"""

from __future__ import annotations

import fnmatch

from compressor.errors import PassError


def prepare(model, logger=None) -> None:
    """Turn fused MoE experts into per-expert Linear layers so that they are quantized like any other layer
    (never silently left in float)."""
    from compressor.moe import unfuse_experts

    n = unfuse_experts(model)
    if n and logger is not None:
        logger.info("split %d fused expert modules into per-expert Linear layers", n)


def select_layers(model, ignore: list[str], prefix: str = "") -> list[tuple[str, object]]:
    """(full name, nn.Linear) of every Linear under `model` whose full name matches no ignore pattern."""
    from torch import nn

    out = []
    for n, m in model.named_modules():
        full = f"{prefix}.{n}" if prefix and n else (prefix or n)
        if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(full, p) for p in ignore):
            out.append((full, m))
    return out


def split_ragged(pass_name: str, layers: list, group_size: int | None, policy: str) -> tuple[list, list[str]]:
    """-> (layers the group size tiles, names skipped). policy "error" raises, naming the first layer."""
    if not group_size:
        return layers, []
    ragged = [(n, mod.in_features) for n, mod in layers if mod.in_features % group_size]
    if ragged and policy == "error":
        n, w = ragged[0]
        more = f" (and {len(ragged) - 1} more layers)" if len(ragged) > 1 else ""
        raise PassError(pass_name, [], f"group_size {group_size} does not divide the input width {w} of "
                        f"layer {n}{more}; pick a group size that divides it, or set ragged: skip", exit_code=2)
    skipped = [n for n, _ in ragged]
    return [(n, mod) for n, mod in layers if n not in skipped], skipped


def install_quantized(model, name: str, lin, q, fmt: str, group: int, symmetric: bool, block_size: int = 0,
                      activations: dict | None = None):
    """Replace the Linear `name` in `model` by a QuantLinear holding `q` (a _rtn_math.Quantized)."""
    import torch

    from compressor.kernels.qlinear import QuantLinear, pack_int4

    ql = QuantLinear.like(lin, fmt, group, symmetric, block_size, activations)
    with torch.no_grad():
        ql.weight_packed.copy_(pack_int4(q.codes) if fmt in ("int4", "nvfp4") else q.codes)
        ql.weight_scale.copy_(q.scale)
        if q.zero_point is not None:
            ql.weight_zero_point.copy_(q.zero_point)
        if q.global_scale is not None:
            ql.weight_global_scale.copy_(q.global_scale)
        if lin.bias is not None:
            ql.bias.data.copy_(lin.bias.data)
    model.set_submodule(name, ql)
    return ql


def estimate_tensors(tensors: list, bits: float, group: int, symmetric: bool, ignore: list[str]) -> list:
    """For the plan's estimate, from checkpoint headers: 2-D Linear weights not ignored become packed codes plus
    float32 scales (and zero points); embeddings and everything else keep their size. group: > 0 per group,
    0 per channel, -1 per tensor."""
    out = []
    for name, shape, nbytes in tensors:
        module = name.removesuffix(".weight")
        if (len(shape) == 2 and name.endswith(".weight") and "embed" not in module
                and not any(fnmatch.fnmatchcase(module, p) for p in ignore)):
            rows, cols = shape
            groups = cols // group if group > 0 else 1
            params = (1 if group == -1 else rows) * groups
            nbytes = int(rows * cols * bits / 8) + params * (4 if symmetric else 5)
        out.append((name, shape, int(nbytes)))
    return out


def run_blocks(pass_name: str, model, batches, work, ctx, no_tokens: dict, borrowed: str) -> None:
    """Layer-sequential calibration for a quantization pass: progress, NaN activations as a PassError naming
    the layer, and a warning listing MoE experts that got no tokens (and what they borrowed instead)."""
    from compressor.calibration.forward_loop import decoder_blocks, layer_sequential
    from compressor.calibration.stats import NonFiniteActivation

    ctx.logger.info("%s: %d calibration samples x %d tokens, %d blocks", pass_name, *batches.shape,
                    len(decoder_blocks(model)))
    try:
        layer_sequential(model, batches, work, ctx.progress)
    except NonFiniteActivation as e:
        raise PassError(pass_name, [], str(e)) from None
    if no_tokens:
        ctx.logger.warning("%s: %d expert layers received no calibration tokens; they use their sibling experts' "
                           "%s: %s", pass_name, len(no_tokens), borrowed, sorted(no_tokens))
