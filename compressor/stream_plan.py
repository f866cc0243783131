"""What a streamed run (`model.streaming: true`) accepts, and its peak-memory estimate. No torch here: `compress
plan` imports this.

A streamed run holds one unit at a time (a decoder block, the embedding, the final norm, the LM head) and
writes each unit's output as soon as it is done, so its peak is a constant plus the largest unit, never the
model. The estimate, from the checkpoint's headers:

    peak = BASE (interpreter, torch, transformers)
         + the unit whose weights plus quantization work are largest, in the run's dtype
           (+ the largest tensor as read when the run's dtype differs from the checkpoint's)
         + quantization working memory of its largest Linear: RTN ~ WORK_RTN x its float32 size
           (float32 copies, codes, dequantized check, float64 SQNR)
         + GPTQ: the larger of the block's float64 Hessians and GPTQ's float64 working set for the widest
           layer (copies of H, its Cholesky factors, W, Q), the tokenized calibration corpora, and the
           calibration activations if they are kept in memory
"""

from __future__ import annotations

import math

from compressor.errors import RecipeError
from compressor.recipe import ASSET_PREFIX, is_local_path, line_of

SUPPORTED = ("quantize_rtn", "quantize_gptq")
EXPORT = "export_checkpoint"
BASE_BYTES = 410e6  # measured: python + torch + transformers + tokenizers, the meta model and the tokenizer
WORK_RTN = 9.0  # measured: RTN of an 11008 x 4096 Linear in a 7B block peaks 1.63 GB above the block (the float64
# SQNR check beside the dequantized weight), 9 float32 copies of it
GPTQ_H = 4  # float64 copies of a layer's Hessian alive at once: ours + GPTQ's clone + two inside its inverse
# Cholesky (each freed as the next exists). Measured: a 16-layer 1B-shaped GPTQ run peaked at 2.00 GB (estimate 2.20)
CALIBRATION = 330e6  # measured: the corpora read and tokenized (110 MB) and what embedding them leaves resident
ACTIVATIONS_IN_MEMORY = 256 << 20  # calibration activations above this go to a file in the output's temp folder
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check(recipe, lines: dict) -> None:
    """RecipeError naming the key for anything a streamed run cannot do (before any weight is read)."""
    file = recipe.path or "<recipe>"

    def err(msg: str, loc: tuple) -> RecipeError:
        return RecipeError(msg, file=file, line=line_of(lines, loc), key=".".join(map(str, loc)))

    src = recipe.model.source
    if not src.startswith(ASSET_PREFIX) and (not is_local_path(src) or src.endswith(".gguf")):
        raise err("model.streaming reads a local safetensors folder (not a hub id or a .gguf file)",
                  ("model", "source"))
    if recipe.eval is not None:
        raise err("a streamed run has no eval: evaluation loads the whole model; evaluate the checkpoint it "
                  "writes in a separate run (or set model.streaming: false)", ("eval",))
    quant = [(i, p) for i, p in enumerate(recipe.passes)]
    for i, p in quant:
        if p.name not in SUPPORTED:
            raise err(f"pass {p.name} cannot run streamed (model.streaming: true runs {', '.join(SUPPORTED)} and "
                      f"{EXPORT})", ("passes", i, "pass"))
        act = p.options.get("activations")
        if isinstance(act, dict) and act.get("dynamic") is False:
            raise err(f"pass {p.name}: static activation scales are calibrated on the whole model; a streamed run "
                      "takes dynamic activations only", ("passes", i, "activations"))
    if len(quant) > 1:
        raise err("a streamed run applies one quantization pass", ("passes", 1, "pass"))
    exports = list(enumerate(recipe.export))
    for i, p in exports:
        if p.name != EXPORT:
            raise err(f"pass {p.name} cannot run streamed (model.streaming: true exports with {EXPORT} only)",
                      ("export", i, "pass"))
        if p.options.get("format", "compressor") != "compressor":
            raise err(f"{EXPORT} format {p.options['format']} is not written streamed; use format: compressor",
                      ("export", i, "format"))
    if len(exports) != 1:
        raise err(f"a streamed run writes its result with exactly one {{pass: {EXPORT}}} in export:", ("export",))


def _unit_of(name: str) -> str:
    """model.layers.3.mlp.up_proj.weight -> model.layers.3; lm_head.weight -> lm_head."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def estimate(plan, tensors: list) -> dict:
    """Peak resident memory of a streamed run from (name, shape, bytes) headers; see the module docstring."""
    import fnmatch

    recipe = plan.recipe
    size = _DTYPE_BYTES[recipe.model.dtype]
    quant = plan.transforms[0] if plan.transforms else None
    ignore = quant.config.ignore if quant is not None else []
    units: dict[str, int] = {}
    quantized: dict[str, list] = {}  # unit -> shapes of the Linear weights its pass quantizes
    cast = 0  # a tensor read in the checkpoint's dtype and cast to the run's: both live for a moment
    for name, shape, nbytes in tensors:
        u = _unit_of(name)
        units[u] = units.get(u, 0) + math.prod(shape) * size
        if nbytes != math.prod(shape) * size:
            cast = max(cast, nbytes)
        module = name.removesuffix(".weight")
        if (quant is not None and len(shape) == 2 and name.endswith(".weight") and "embed" not in module
                and not any(fnmatch.fnmatchcase(module, p) for p in ignore)
                and (quant.name == "quantize_rtn" or u.split(".")[-1].isdigit())):
            quantized.setdefault(u, []).append(shape)
    work: dict[str, float] = {}
    acts = 0
    for u, shapes in quantized.items():
        if quant.name == "quantize_rtn":
            work[u] = WORK_RTN * 4 * max(math.prod(s) for s in shapes)
            continue
        # GPTQ: the block's float64 Hessians (one per Linear input) while the windows run through it; then,
        # quantizing the widest layer (its Hessian alone left), float64 copies of H (ours; in GPTQ the clone,
        # then the damped copy / its Cholesky factor / the inverse / its factor, two at a time: GPTQ_H x in^2)
        # and of W, Q and the updates (3 x out x in).
        out, inp = max(shapes, key=lambda s: s[1] * (s[1] + s[0]))
        c = recipe.calibration
        # One window through the block: a few (L, widest output) float32 activations of the MLP.
        row = 4 * c.seq_len * max(s[0] for s in shapes) * 4
        work[u] = max(sum(8 * s[1] ** 2 for s in shapes), 8 * (GPTQ_H * inp * inp + 3 * out * inp)) + row + CALIBRATION
        act_bytes = c.num_samples * c.seq_len * shapes[0][1] * size
        acts = act_bytes if act_bytes <= ACTIVATIONS_IN_MEMORY else 0
    peak_unit = max(units, key=lambda u: units[u] + work.get(u, 0))
    held = units[peak_unit] + work.get(peak_unit, 0)
    peak = BASE_BYTES + held + cast + acts
    return {"peak_memory_bytes": int(peak),
            "streaming": {"base": int(BASE_BYTES), "largest_unit": int(units[peak_unit]), "read": int(cast),
                          "quantize_work": int(work.get(peak_unit, 0)), "activations_in_memory": int(acts),
                          "units": len(units), "peak_unit": peak_unit}}
