"""build_engine: a TensorRT engine from the `tensorrt`-flavour ONNX graph, in `engine/`.

Strongly typed network (precision comes from the graph's Q/DQ), TensorRT's ONNX parser, one optimization
profile per entry of `profiles` (min/opt/max of batch, seq and past_seq; total_seq = past_seq + seq), a timing
cache kept beside the engine, and the plugin library loaded when the graph has plugin nodes (kernels/).

TensorRT is imported only here and only when present. Without it the folder still holds everything to build
the engine elsewhere: the ONNX graph, the plugin sources, `build.sh` (the trtexec line with the same profiles
and plugin flags) and `build.json`; the report says "engine not built: TensorRT not installed". When an engine is
built, the manifest records the TensorRT version and GPU architecture it is tied to.

Example:

    export:
      - pass: export_onnx
        flavour: tensorrt
      - pass: build_engine
        profiles:
          - {name: prefill, batch: [1, 1, 8], seq: [1, 128, 2048], past_seq: [0, 0, 0]}
          - {name: decode, batch: [1, 8, 64], seq: [1, 1, 1], past_seq: [1, 512, 4096]}
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compressor.errors import PassError
from compressor.registry import Artifact, PassResult, register_pass

Range = tuple[int, int, int]


class ProfileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("default", pattern=r"^[A-Za-z0-9][\w.-]*$")
    batch: Range = (1, 1, 8)
    seq: Range = (1, 128, 2048)
    past_seq: Range = (0, 0, 0)

    @field_validator("batch", "seq", "past_seq")
    @classmethod
    def _ordered(cls, v: Range, info) -> Range:
        lo, opt, hi = v
        if not lo <= opt <= hi:
            raise ValueError(f"{info.field_name}: need min <= opt <= max, got [{lo}, {opt}, {hi}]")
        if lo < (0 if info.field_name == "past_seq" else 1):
            raise ValueError(f"{info.field_name}: min {lo} is below {0 if info.field_name == 'past_seq' else 1}")
        return v


class BuildEngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    onnx_folder: str = Field("onnx-tensorrt", pattern=r"^[A-Za-z0-9][\w.-]*$",
                             description="folder of the tensorrt-flavour export_onnx to build from")
    folder: str = Field("engine", pattern=r"^[A-Za-z0-9][\w.-]*$")
    profiles: list[ProfileConfig] = Field(
        default_factory=lambda: [ProfileConfig(name="prefill"),
                                 ProfileConfig(name="decode", batch=(1, 8, 64), seq=(1, 1, 1), past_seq=(1, 512, 4096))],
        min_length=1)
    plugin_library: str | None = Field(None, description="a built plugin library (.so); default: build.sh builds it")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization level")

    @field_validator("plugin_library")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"plugin library {v} does not exist")
        return v


def _kernels_dir() -> Path | None:
    """The plugin sources: package data `compressor.kernels.src` in a wheel install; the repository's kernels/
    folder (next to kernels/python, which is `compressor.kernels`) in an editable one."""
    import compressor.kernels

    here = Path(compressor.kernels.__file__).resolve().parent
    for root in (here / "src", here.parent):
        if (root / "CMakeLists.txt").is_file():
            return root
    return None


def _plugin_ops(onnx_path: Path) -> list[str]:
    import onnx

    from compressor.tensorrt_rules import PLUGINS

    m = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({n.op_type for n in m.graph.node if (n.op_type, n.domain) in PLUGINS})


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _build_script(cmd: list[str], build_plugins: bool) -> str:
    lines = ["#!/usr/bin/env bash",
             "# Builds model.plan from model.onnx with TensorRT's trtexec (written by compressor's build_engine).",
             "# Each --minShapes/--optShapes/--maxShapes set is one optimization profile (see build.json).",
             "set -euo pipefail", 'cd "$(dirname "$0")"']
    if build_plugins:
        lines += ["# The plugin library: CMake finds TensorRT through TensorRT_ROOT or the standard paths.",
                  "cmake -S plugins -B plugins/build -DCMAKE_BUILD_TYPE=Release",
                  "cmake --build plugins/build -j"]
    lines.append(" \\\n  ".join(shlex.quote(c) for c in cmd))
    return "\n".join(lines) + "\n"


@register_pass("build_engine", config=BuildEngineConfig, consumes=Artifact.ONNX, produces=Artifact.ENGINE,
               output_bytes=lambda cfg, tensors: tensors)
def run(handle, cfg: BuildEngineConfig, ctx) -> PassResult:
    from compressor import trt_build

    onnx_path = ctx.workdir / cfg.onnx_folder / "model.onnx"
    if not onnx_path.is_file():
        raise PassError("build_engine", [], f"{cfg.onnx_folder}/model.onnx not found: add an export_onnx pass with "
                        f"flavour: tensorrt before build_engine (or set onnx_folder)", exit_code=2)
    folder = ctx.workdir / cfg.folder
    folder.mkdir(parents=True, exist_ok=False)
    for f in (ctx.workdir / cfg.onnx_folder).iterdir():
        _link_or_copy(f, folder / f.name)
    inputs = trt_build.graph_inputs(onnx_path)
    profiles = [trt_build.Profile(p.name, {"batch": p.batch, "seq": p.seq, "past_seq": p.past_seq})
                for p in cfg.profiles]
    try:
        shapes = [p.shapes(inputs) for p in profiles]
    except ValueError as e:
        raise PassError("build_engine", [], str(e), exit_code=2) from None
    plugin_ops = _plugin_ops(onnx_path)
    kernels = _kernels_dir()
    build_plugins = bool(plugin_ops) and cfg.plugin_library is None
    if plugin_ops and kernels is not None:
        dst = folder / "plugins"
        shutil.copytree(kernels, dst, ignore=shutil.ignore_patterns("python", "build", "__pycache__"))
    plugin_lib = "plugins/build/libcompressor_moe_plugin.so" if build_plugins else None
    if cfg.plugin_library:  # a copy in the artifact folder: libraries are loaded only from the run's own folder
        (folder / "plugins").mkdir(exist_ok=True)
        plugin_lib = f"plugins/{Path(cfg.plugin_library).name}"
        shutil.copy2(cfg.plugin_library, folder / plugin_lib)
    from compressor.onnx_export import read_sparsity

    sparse_layers = sorted(n for n, pat in read_sparsity(onnx_path).items() if pat == "2:4")
    cmd = trt_build.trtexec_command("model.onnx", "model.plan", profiles, inputs, plugin_lib, "timing.cache",
                                    cfg.optimization_level, sparse_weights=bool(sparse_layers))
    (folder / "build.sh").write_text(_build_script(cmd, build_plugins))
    (folder / "build.sh").chmod(0o755)
    spec = {"onnx": "model.onnx", "engine": "model.plan", "plugin_ops": plugin_ops, "plugin_library": plugin_lib,
            "strongly_typed": True, "optimization_level": cfg.optimization_level, "timing_cache": "timing.cache",
            "sparse_weights": bool(sparse_layers), "sparse_2of4_layers": sparse_layers,
            "profiles": [{"name": p.name, "ranges": p.ranges, "shapes": s} for p, s in zip(profiles, shapes)],
            "trtexec": cmd}
    (folder / "build.json").write_text(json.dumps(spec, indent=2) + "\n")
    info = {"profiles": [p.name for p in profiles], "plugin_ops": plugin_ops, "sparse_2of4_layers": len(sparse_layers),
            "notes": []}
    if sparse_layers:
        info["notes"].append(f"{len(sparse_layers)} layers are 2:4 sparse: the engine is built with sparse weights "
                             f"enabled (--sparsity=enable, BuilderFlag.SPARSE_WEIGHTS)")
    if plugin_ops and kernels is None:
        info["notes"].append("plugin sources not found next to the installed package (a non-editable install); "
                             "copy kernels/ from the compressor repository into engine/plugins before build.sh")
    version = trt_build.tensorrt_available()
    if version is None:
        note = (f"engine not built: TensorRT not installed; {cfg.folder}/build.sh builds it with trtexec "
                f"({len(profiles)} profiles{', plugins ' + ', '.join(plugin_ops) if plugin_ops else ''})")
        ctx.logger.warning("build_engine: %s", note)
        info.update(built=False, notes=info["notes"] + [note])
        return PassResult(artifacts=[{"kind": "engine", "path": f"{cfg.folder}/build.sh", "built": False}], info=info)
    if build_plugins:
        raise PassError("build_engine", [], f"the graph has plugin nodes ({', '.join(plugin_ops)}): build the plugin "
                        f"library with kernels/CMakeLists.txt and set plugin_library", exit_code=2)
    try:
        built = trt_build.build(onnx_path, folder / "model.plan", profiles, plugin_lib and folder / plugin_lib,
                                folder / "timing.cache",
                                cfg.optimization_level, ctx.logger, sparse_weights=bool(sparse_layers))
    except RuntimeError as e:
        raise PassError("build_engine", [], str(e)) from None
    info.update(built=True, **built)
    return PassResult(artifacts=[{"kind": "engine", "path": f"{cfg.folder}/model.plan", "built": True,
                                  "tensorrt_version": built["tensorrt_version"], "gpu_arch": built["gpu_arch"]}],
                      info=info)
