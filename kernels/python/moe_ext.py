"""The MoE CUDA kernels (kernels/csrc/moe_kernels.cu) as a torch extension, compiled at run time with
`torch.utils.cpp_extension.load`. For GPU machines only (scripts/gpu_check_moe.py); the TensorRT plugin
links the same kernels without torch.

    ext = load()                      # compiles once per build_dir (about a minute), then cached
    out = moe_forward(ext, hidden, logits, st["w_gate_up"], st["w_down"], top_k=2,
                      weight_format=st["weight_format"], s_gate_up=st["s_gate_up"], s_down=st["s_down"])
"""

from __future__ import annotations

from pathlib import Path

import torch

from compressor.errors import MissingDependency

CSRC = Path(__file__).resolve().parents[1] / "csrc"
FORMAT_IDS = {"bf16": 0, "fp8": 1, "int4": 2}  # CompressorMoeWeightFormat in moe_kernels.h


def load(build_dir: str | Path | None = None, verbose: bool = False):
    """Compile (or reuse) the extension for the current GPU's architecture and return the module."""
    if not torch.cuda.is_available():
        raise MissingDependency("a CUDA GPU and a CUDA build of torch", "the MoE CUDA extension",
                                "run on a GPU machine with torch built for CUDA")
    from torch.utils.cpp_extension import load as _load

    major, minor = torch.cuda.get_device_capability()
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    kwargs = {}
    if build_dir is not None:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
        kwargs["build_directory"] = str(build_dir)
    return _load(name="compressor_moe_ext",
                 sources=[str(CSRC / "moe_torch_binding.cpp"), str(CSRC / "moe_kernels.cu")],
                 extra_include_paths=[str(CSRC)], extra_cflags=["-O2"], extra_cuda_cflags=["-O3", arch],
                 verbose=verbose, **kwargs)


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
