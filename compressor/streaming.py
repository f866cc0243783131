"""Streaming compression: checkpoints larger than memory, one unit at a time (`model.streaming: true`).

The model is built on torch's meta device (shapes, no memory). Each unit (the embedding, every decoder block,
the final norm, the LM head) is read tensor by tensor from the safetensors checkpoint (sharded or not,
compressor.stream_io), quantized by the recipe's pass, written to the output shards and dropped before the
next is read, so peak memory is a constant plus one unit, whatever the number of layers. `compress plan`
prints the estimate (compressor.stream_plan).

- quantize_rtn runs the pass itself on each unit (round-to-nearest needs no calibration): the numbers are
  those of an in-memory run of the same recipe, tensor for tensor.
- quantize_gptq is layer-sequential (compressor.stream_gptq): the calibration windows are embedded once, each
  block's Hessians are gathered from them, its Linears quantized, and the block's outputs (computed with the
  quantized weights) become the next block's inputs; they are kept in a file when large.
- export_checkpoint (format compressor) is the only export: shards of at most 2 GB with
  model.safetensors.index.json, config.json with the quantization metadata, tokenizer. `compress` and
  `load_model` read it back like an in-memory export.

Not streamed: evaluation (it needs the whole model; evaluate the checkpoint in another run), other passes,
static activation scales, compressed-tensors export, MoE models. The plan refuses them naming the key. Output
goes to a temporary folder renamed on success; a full disk stops the run with one line naming the file
(exit 2) and leaves nothing.

Example (the 7B-shaped benchmark: `compress recipes/stream-w4a16-rtn.yaml --target h200 --model DIR`):

    model: {source: ./llama-2-7b, dtype: bfloat16, streaming: true}
    passes:
      - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 128}
    export:
      - {pass: export_checkpoint}
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from compressor.errors import InputError, PassError

log = logging.getLogger("compressor")
SHARD_BYTES = 2 << 30


class _Quiet(logging.LoggerAdapter):
    """The per-unit pass runs log warnings only (their one-line summaries would repeat for every block)."""

    def info(self, *args, **kwargs) -> None:
        pass


def resolve_folder(source: str) -> Path:
    from compressor import assets
    from compressor.recipe import ASSET_PREFIX

    folder = assets.resolve(source[len(ASSET_PREFIX):]) if source.startswith(ASSET_PREFIX) else Path(source)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} has no config.json: not a Hugging Face model folder")
    return folder


def header_fingerprint(folder: Path) -> str:
    """sha256 over config.json and every safetensors header and size (hashing 13 GB of weights would cost
    minutes; the headers pin names, shapes, dtypes and offsets)."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + fh.read(n) + str(f.stat().st_size).encode())
    return h.hexdigest()


def meta_model(folder: Path, dtype: str):
    """The model's modules on the meta device (no weight memory), in eval mode, without gradients."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    if getattr(cfg, "quantization_config", None):
        raise InputError(f"{folder} is already quantized (config.json has a quantization_config)")
    if any(getattr(cfg, k, None) for k in ("num_local_experts", "num_experts")):
        raise InputError(f"{folder}: MoE models are not streamed (their experts are fused tensors)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.eval().requires_grad_(False)
    return model


def units(model) -> list[tuple[str, object, bool]]:
    """(name, module, is_block) in checkpoint order: modules owning weights outside the decoder blocks, and
    each block."""
    from compressor.calibration.forward_loop import decoder_blocks

    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    out = []
    for name, m in model.named_modules():
        if name == prefix:
            out += [(f"{prefix}.{i}", b, True) for i, b in enumerate(blocks)]
        elif not name.startswith(prefix + ".") and (any(True for _ in m.parameters(recurse=False))
                                                  or m._buffers.keys() - m._non_persistent_buffers_set):
            out.append((name, m, False))
    return out


class Materializer:
    """Loads a meta unit's tensors from the checkpoint (cast to the run's dtype) and drops them again."""

    def __init__(self, model, reader, dtype: str):
        import torch

        self.reader, self.dtype = reader, getattr(torch, dtype)
        self.alias = {}
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and out_emb.weight is in_emb.weight:  # tied: the LM head reads the embedding
            names = {id(m): n for n, m in model.named_modules()}
            self.alias[names[id(out_emb)] + ".weight"] = names[id(in_emb)] + ".weight"

    def load(self, name: str, unit) -> None:
        import torch

        state = {}
        for key, want in unit.state_dict().items():
            full = f"{name}.{key}" if name else key
            src = full if full in self.reader else self.alias.get(full)
            if src is None or src not in self.reader:
                raise InputError(f"{self.reader.folder}: tensor {full} is missing from the checkpoint")
            if self.reader.shape(src) != tuple(want.shape):
                raise InputError(f"{self.reader.folder}: tensor {src} has shape {self.reader.shape(src)}, "
                                 f"the config says {tuple(want.shape)}")
            t = self.reader.get(src)
            if t.is_floating_point():
                t = t.to(self.dtype)
                if not torch.isfinite(t).all():
                    raise InputError(f"weight {src} of {self.reader.folder} contains NaN or Inf")
            state[key] = t
        unit.load_state_dict(state, strict=True, assign=True)
        left = [n for n, b in unit.named_buffers() if b.is_meta]
        if left:
            raise InputError(f"{name}: computed buffers {left} cannot be streamed (unsupported architecture)")

    @staticmethod
    def drop(unit) -> None:
        unit.to("meta")


def skeleton(name: str, unit):
    """A bare root module holding `unit` at its full dotted name, so a pass sees the model's layer names."""
    from torch import nn

    root = nn.Module()
    node = root
    parts = name.split(".")
    for p in parts[:-1]:
        node.add_module(p, nn.Module())
        node = getattr(node, p)
    node.add_module(parts[-1], unit)
    return root


@contextmanager
def large_blocks_returned():
    """While it is open, glibc serves every allocation of 4 MB or more by its own mapping, returned to the OS
    when freed (M_MMAP_THRESHOLD; glibc's own threshold rises to 32 MB as large blocks are freed, and freed
    blocks below it stay resident). Measured on a GPTQ run: 11% lower peak, ~15% slower. On exit the threshold
    is set to 32 MB, where glibc's own adjustment ends up."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        mallopt = None
    if mallopt is not None:
        mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(-3, 32 << 20)


def release_freed_memory() -> None:
    """Hand the unit's freed heap back to the OS (glibc keeps freed blocks under 32 MB in its arenas, which
    would otherwise count in the resident set as the next unit is read)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def resident_bytes(model) -> int:
    """Bytes of real (non-meta) weights the model holds now."""
    ts = {id(t): t for t in (*model.parameters(), *model.buffers()) if not t.is_meta}
    return sum(t.numel() * t.element_size() for t in ts.values())


def _rtn(transform, ctx, model):
    """Per-unit quantize_rtn: the pass itself, run on a skeleton holding one unit."""
    from compressor.passes.quantize._layers import select_layers, split_ragged

    cfg = transform.config
    layers = select_layers(model, cfg.ignore)
    if not layers:
        raise PassError(transform.name, [], f"no Linear layers left to quantize after ignore={cfg.ignore}", exit_code=2)
    split_ragged(transform.name, layers, cfg.group if cfg.group > 0 else None, cfg.ragged)  # before any read
    infos = []

    def work(name, unit, is_block):
        root = skeleton(name, unit)
        if select_layers(root, cfg.ignore):
            infos.append(transform.info.run(SimpleNamespace(model=root), cfg, ctx).info)
        new = root.get_submodule(name)
        if new is not unit:  # the unit was itself a Linear (the LM head): now a QuantLinear
            model.set_submodule(name, new)
        return new

    def summary() -> dict:
        sqnr = {k: v for i in infos for k, v in i["sqnr_db"].items()}
        vals = sorted(sqnr.values())
        return {"layers_quantized": len(sqnr), "layers_skipped_ragged": [n for i in infos for n in
                                                                          i["layers_skipped_ragged"]],
                "sqnr_db_min": vals[0], "sqnr_db_median": vals[len(vals) // 2],
                "worst_layer": min(sqnr, key=sqnr.get), "sqnr_db": sqnr}

    return work, summary


def _stream(plan, folder: Path, ctx) -> tuple[list[Path], dict, dict]:
    """Quantize and write every unit. -> (weight files, pass info, export info)."""
    import tempfile

    from compressor.checkpoint_io import FORMAT_VERSION, QUANT_METHOD, quantized_layers
    from compressor.context import RunContext
    from compressor.eval.measure import peak_rss_mb
    from compressor.stream_io import CheckpointReader, ShardWriter
    from transformers import AutoTokenizer

    recipe = plan.recipe
    model = meta_model(folder, recipe.model.dtype)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"no usable tokenizer in {folder}: {type(e).__name__}: {e}") from None
    reader = CheckpointReader(folder)
    mat = Materializer(model, reader, recipe.model.dtype)
    transform = plan.transforms[0] if plan.transforms else None
    export = plan.lowerings[0]
    inner = RunContext(ctx.target, ctx.workdir, ctx.cache_dir, ctx.seed, True, _Quiet(log, {}),
                       cache_enabled=ctx.cache_enabled)
    work, summary, scratch = None, None, None
    rtn = transform is not None and transform.name == "quantize_rtn"
    if rtn:
        work, summary = _rtn(transform, inner, model)
    elif transform is not None:
        from compressor.stream_gptq import StreamGPTQ

        scratch = tempfile.TemporaryDirectory(dir=ctx.workdir, prefix=".activations-")
        g = StreamGPTQ(model, tok, recipe, transform, Path(scratch.name), inner)
        g.start(mat, [(n, u) for n, u, b in units(model)])
        work, summary = g.work, g.summary
    writer = ShardWriter(ctx.workdir / export.config.folder, SHARD_BYTES)
    todo = units(model)
    layers, emitted, peak_resident = {}, set(), 0
    t0 = time.perf_counter()
    for k, (name, unit, is_block) in enumerate(ctx.progress(todo, total=len(todo), desc="stream", unit="unit")):
        keys = [f"{name}.{key}" for key in unit.state_dict()]
        if keys and all(key in mat.alias for key in keys) and not (rtn and _selected(unit, name, transform)):
            continue  # the tied LM head is the embedding, written once (as an in-memory export does)
        mat.load(name, unit)
        peak_resident = max(peak_resident, resident_bytes(model))
        if work is not None:
            unit = work(name, unit, is_block)
        peak_resident = max(peak_resident, resident_bytes(model))
        layers.update({f"{name}.{n}" if n else name: s for n, s in quantized_layers(unit).items()})
        for key, t in unit.state_dict(prefix=f"{name}.").items():
            if key not in emitted:
                writer.add(key, t)
                emitted.add(key)
        mat.drop(unit)
        release_freed_memory()
        if is_block:
            done, secs = k + 1, time.perf_counter() - t0
            log.info("stream: %s done (%d/%d units, %.0f s, ETA %.0f s, peak RSS %.2f GB)", name, done, len(todo),
                     secs, secs / done * (len(todo) - done), peak_rss_mb() / 1024)
    info = summary() if summary is not None else {}  # (closes GPTQ's activation store)
    if scratch is not None:
        scratch.cleanup()
    files = writer.finish()
    out = writer.folder
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    if layers:
        cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    info["max_resident_weight_bytes"] = peak_resident
    export_info = {"quantized_layers": len(layers), "shards": len(files), "bytes": writer.total}
    log.info("stream: wrote %s (%d shards, %.2f GB, %d quantized layers); at most %.2f GB of weights held at once",
             out.name, len(files), writer.total / 1e9, len(layers), peak_resident / 1e9)
    return files, info, export_info


def _selected(unit, name, transform) -> bool:
    from compressor.passes.quantize._layers import select_layers

    return bool(select_layers(skeleton(name, unit), transform.config.ignore))


def run_streaming(plan, out: Path, *, overwrite: bool, quiet: bool, t_start: float):
    """The pipeline's run for `model.streaming: true`: same output folder, manifest and report as run_recipe."""
    from compressor import __version__, assets
    from compressor.artifacts import atomic_output, describe_artifact, versions
    from compressor.cache import key_of
    from compressor.context import RunContext
    from compressor.eval.measure import peak_rss_mb
    from compressor.pipeline import RunSummary, _evaluate_and_report
    from compressor.stream_io import CheckpointReader, disk_full, raise_disk_full

    recipe = plan.recipe
    folder = resolve_folder(recipe.model.source)
    fingerprint = header_fingerprint(folder)
    with atomic_output(out, overwrite) as tmp:
        ctx = RunContext(plan.target, tmp, assets.home() / "cache", recipe.seed, quiet, log)
        log.info("streaming %s one unit at a time", folder)
        try:
            t = time.perf_counter()
            with large_blocks_returned():
                files, info, export_info = _stream(plan, folder, ctx)
            secs = time.perf_counter() - t
            export = plan.lowerings[0]
            rel = [f"{export.config.folder}/{f.name}" for f in files]
            artifacts = [describe_artifact(tmp, r, "checkpoint") for r in rel]
            provenance = [{"name": p.name, "section": p.section, "config": p.config_dict(), "cached": False,
                           "seconds": round(secs, 3) if p is not export else 0.0,
                           "info": (export_info if p is export else info) | {"streamed": True}} for p in plan.passes]
            reader = CheckpointReader(folder)
            n_params = sum(math.prod(reader.shape(n)) for n in reader.entries)
            stage_key = key_of("stream", __version__, fingerprint, recipe.model.dtype,
                               [[p.name, p.config_dict()] for p in plan.passes])
            report = _evaluate_and_report(plan, _Handle(fingerprint, _architecture(folder)), ctx, None, stage_key,
                                          provenance, artifacts, time.perf_counter() - t_start, n_params,
                                          peak_rss_mb())
            manifest = {"schema_version": 1, "recipe": recipe.model_dump(mode="json", exclude={"path"}),
                        "recipe_path": str(recipe.path), "target": plan.target.name, "versions": versions(),
                        "model": {"source": recipe.model.source, "path": str(folder), "sha256_headers": fingerprint},
                        "stage_key": stage_key, "passes": provenance, "artifacts": artifacts, "streamed": True}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        except OSError as e:
            if disk_full(e):
                raise_disk_full(e, e.filename or tmp)
            raise
    return RunSummary(Path(out).absolute(), report, [], time.perf_counter() - t_start)


def _architecture(folder: Path) -> str:
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or ["unknown"]
    return archs[0]


class _Handle:
    """What the report needs of a model: its fingerprint and architecture name (no weights)."""

    def __init__(self, fingerprint: str, arch: str):
        self.fingerprint = fingerprint
        self.model = type(arch, (), {})()
