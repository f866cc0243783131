"""TensorRT engine build from a `tensorrt`-flavour ONNX graph: the spec (profiles, plugins, cache), the trtexec
line that reproduces it, and the builder call through TensorRT's Python API.

Everything but `build` works without TensorRT: shape ranges are validated and turned into per-input min/opt/max
shapes from the graph's named dimensions (batch, seq, past_seq, total_seq = past_seq + seq). `build` imports
`tensorrt` lazily; where it is absent the caller writes `build.sh` (the trtexec line) and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DIMS = ("batch", "seq", "past_seq")


@dataclass(frozen=True)
class Profile:
    """min/opt/max of each named dimension, e.g. {"batch": (1, 1, 8), "seq": (1, 128, 2048), "past_seq": (0, 0, 0)}."""

    name: str
    ranges: dict[str, tuple[int, int, int]]

    def validate(self, where: str) -> None:
        for dim in DIMS:
            if dim not in self.ranges:
                raise ValueError(f"{where}: profile {self.name!r} has no range for {dim}")
            lo, opt, hi = self.ranges[dim]
            if not lo <= opt <= hi:
                raise ValueError(f"{where}: profile {self.name!r} {dim}: need min <= opt <= max, got "
                                 f"[{lo}, {opt}, {hi}]")
            if lo < (0 if dim == "past_seq" else 1):
                raise ValueError(f"{where}: profile {self.name!r} {dim}: min {lo} is below "
                                 f"{0 if dim == 'past_seq' else 1}")

    def shapes(self, inputs: dict[str, list]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """{input name: (min shape, opt shape, max shape)} for graph inputs given as {name: [dim, ...]} where a
        dim is an int or a dimension name."""
        out = {}
        for name, dims in inputs.items():
            triple = []
            for k in range(3):
                vals = {d: r[k] for d, r in self.ranges.items()}
                vals["total_seq"] = vals["seq"] + vals["past_seq"]
                shape = []
                for d in dims:
                    if isinstance(d, int):
                        shape.append(d)
                    elif d in vals:
                        shape.append(vals[d])
                    else:
                        raise ValueError(f"input {name}: dimension {d!r} has no range in profile {self.name!r}")
                triple.append(tuple(shape))
            out[name] = tuple(triple)
        return out


def graph_inputs(onnx_path: Path) -> dict[str, list]:
    """{input name: [int | dim name, ...]} from the ONNX file's declared input shapes."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}


def _spec(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(onnx_name: str, engine_name: str, profiles: list[Profile], inputs: dict[str, list],
                    plugin_library: str | None, timing_cache: str, opt_level: int,
                    sparse_weights: bool = False) -> list[str]:
    """The trtexec argv that builds the same engine: strongly typed (precision comes from the graph's Q/DQ), one
    --minShapes/--optShapes/--maxShapes set per optimization profile, the plugin library, the timing cache, and
    2:4 sparse tactics when the graph's weights were pruned 2:4."""
    cmd = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}", "--stronglyTyped",
           f"--timingCacheFile={timing_cache}", f"--builderOptimizationLevel={opt_level}"]
    if sparse_weights:
        cmd.append("--sparsity=enable")
    for p in profiles:
        shapes = p.shapes(inputs)
        for k, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            cmd.append(flag + "=" + ",".join(f"{n}:{_spec(s[k])}" for n, s in shapes.items()))
    if plugin_library:
        cmd.append(f"--dynamicPlugins={plugin_library}")
    return cmd


def tensorrt_available() -> str | None:
    """TensorRT's version, or None when the `tensorrt` package cannot be imported."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def check_plugin_inside(library: str | Path, folder: Path) -> Path:
    """A plugin library is native code run in this process: load it only from the run's own artifact folder
    (build_engine copies a user's library there). -> the resolved path; RuntimeError for one outside."""
    lib, root = Path(library).resolve(), Path(folder).resolve()
    if not lib.is_relative_to(root):
        raise RuntimeError(f"plugin library {library} is outside the engine folder {folder}: refused")
    return lib


def build(onnx_path: Path, engine_path: Path, profiles: list[Profile], plugin_library: str | None,
          timing_cache: Path, opt_level: int, log, sparse_weights: bool = False) -> dict:
    """Build and serialize the engine with TensorRT's Python API. -> {tensorrt_version, gpu_arch, seconds}."""
    import time

    import tensorrt as trt

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin_library:
        check_plugin_inside(plugin_library, engine_path.parent)
        trt.get_plugin_registry().load_library(str(plugin_library))
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if sparse_weights:  # let the builder pick 2:4 sparse tensor-core tactics for the pruned weights
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    inputs = {network.get_input(i).name: list(network.get_input(i).shape) for i in range(network.num_inputs)}
    declared = graph_inputs(onnx_path)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes({n: declared[n] for n in inputs}).items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    log.info("build_engine: building with TensorRT %s (%d profiles)", trt.__version__, len(profiles))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT's builder returned no engine (see the TensorRT log above)")
    engine_path.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    import torch

    arch = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    return {"tensorrt_version": trt.__version__, "gpu_arch": arch, "seconds": round(time.perf_counter() - t0, 1)}
