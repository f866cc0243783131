"""The MoE CUDA kernels (kernels/csrc/moe_kernels.cu) as a torch extension, compiled at run time with
`torch.utils.cpp_extension.load`. For GPU machines only (scripts/gpu_check_moe.py); the TensorRT plugin
links the same kernels without torch.

    ext = load()                      # compiles once per build_dir (about a minute), then cached
    out = moe_forward(ext, hidden, logits, st["w_gate_up"], st["w_down"], top_k=2,
                      weight_format=st["weight_format"], s_gate_up=st["s_gate_up"], s_down=st["s_down"])
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sysconfig
from pathlib import Path

import torch

from compressor.errors import MissingDependency

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NAME = "compressor_moe_ext"
FORMAT_IDS = {"bf16": 0, "fp8": 1, "int4": 2}  # CompressorMoeWeightFormat in moe_kernels.h


def load(build_dir: str | Path | None = None, verbose: bool = False):
    """Compile (or reuse) the extension for the current GPU's architecture and return the module."""
    if not torch.cuda.is_available():
        raise MissingDependency("a CUDA GPU and a CUDA build of torch", "the MoE CUDA extension",
                                "run on a GPU machine with torch built for CUDA")
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    if build_dir is not None:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
    if not cpp_extension.is_ninja_available():
        # torch's loader needs ninja; offline GPU machines may lack it, and nvcc + c++ do the same job.
        return _build_with_compilers(Path(build_dir or "/tmp/compressor_moe_ext"), arch, verbose)
    kwargs = {"build_directory": str(build_dir)} if build_dir is not None else {}
    return cpp_extension.load(name=NAME, sources=[str(CSRC / "moe_torch_binding.cpp"), str(CSRC / "moe_kernels.cu")],
                              extra_include_paths=[str(CSRC)], extra_cflags=["-O2"],
                              extra_cuda_cflags=["-O3", arch], verbose=verbose, **kwargs)


def _build_with_compilers(build_dir: Path, arch: str, verbose: bool):
    """nvcc compiles the kernels, c++ the binding against torch's headers and libraries; then import the .so."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    so = build_dir / f"{NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"
    sources = [CSRC / "moe_kernels.cu", CSRC / "moe_kernels.h", CSRC / "moe_torch_binding.cpp"]
    if not so.exists() or so.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        cuda_home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
        obj = build_dir / "moe_kernels.o"
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        _run([os.path.join(cuda_home, "bin", "nvcc"), arch, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", abi,
              f"-I{CSRC}", "-c", str(CSRC / "moe_kernels.cu"), "-o", str(obj)], verbose)
        incs = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
        libs = cpp_extension.library_paths(device_type="cuda") + [os.path.join(cuda_home, "lib64")]
        _run(["c++", "-O2", "-std=c++17", "-fPIC", "-shared", abi, f"-DTORCH_EXTENSION_NAME={NAME}",
              "-DTORCH_API_INCLUDE_EXTENSION_H", *incs, f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}",
              str(CSRC / "moe_torch_binding.cpp"), str(obj), "-o", str(so), *[f"-L{p}" for p in libs],
              *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-ltorch_cuda",
              "-ltorch_python", "-lcudart"], verbose)
    spec = importlib.util.spec_from_file_location(NAME, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building the MoE extension failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")


def moe_forward(ext, hidden: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, top_k: int, normalize: bool = True, weight_format: str = "bf16",
                s_gate_up: torch.Tensor | None = None, s_down: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Same arguments as `moe_ref.moe_reference` (hidden bf16, logits float32, weights on the GPU); `out`, when
    given, is written in place. fp8 weights may be float8_e4m3fn: they are passed as their bytes."""
    if weight_format not in FORMAT_IDS:
        raise ValueError(f"unknown weight_format {weight_format!r}; expected one of {sorted(FORMAT_IDS)}")
    if w_gate_up.dtype == torch.float8_e4m3fn:
        w_gate_up, w_down = w_gate_up.view(torch.uint8), w_down.view(torch.uint8)
    return ext.moe_forward(hidden, router_logits, w_gate_up, w_down, top_k, normalize, FORMAT_IDS[weight_format],
                           s_gate_up, s_down, out)
