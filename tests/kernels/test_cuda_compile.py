"""The MoE CUDA kernels compile for sm_90 with the nvcc on this machine (no GPU is needed to compile).

The torch binding (kernels/csrc/moe_torch_binding.cpp) is not compiled here: it needs torch's CUDA headers,
which a CPU build of torch lacks; scripts/gpu_check_moe.py builds and runs it on a GPU machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "kernels" / "csrc"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_moe_kernels_compile_for_sm90(tmp_path):
    obj = tmp_path / "moe_kernels.o"
    cmd = ["nvcc", "-arch=sm_90", "-std=c++17", "-O3", "-Werror=all-warnings", "-c",
           str(CSRC / "moe_kernels.cu"), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    assert obj.is_file() and obj.stat().st_size > 0
    if shutil.which("nm"):  # the launcher the plugin and the torch binding link against is exported
        syms = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
        assert "compressor_moe_forward(CompressorMoeShape const&" in syms
        assert "compressor_moe_workspace_size(CompressorMoeShape const&)" in syms


def _tensorrt_include() -> Path | None:
    """TensorRT headers from $TensorRT_ROOT/include or the Debian package path; None when there are none."""
    root = os.environ.get("TensorRT_ROOT")
    for inc in ([Path(root) / "include"] if root else []) + [Path("/usr/include/x86_64-linux-gnu")]:
        if (inc / "NvInfer.h").is_file():
            return inc
    return None


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
@pytest.mark.skipif(_tensorrt_include() is None,
                    reason="no TensorRT headers (set TensorRT_ROOT; NVIDIA/TensorRT's include/ folder is enough)")
def test_moe_plugin_builds_and_passes_host_smoke(tmp_path):
    """CMake builds libcompressor_moe_plugin.so from the headers alone; the smoke program drives it through
    getCreators / createPlugin / the V3 capability interfaces on the CPU."""
    src = Path(__file__).resolve().parents[2] / "kernels"
    root = _tensorrt_include().parent
    steps = [["cmake", "-S", str(src), "-B", str(tmp_path), f"-DTensorRT_ROOT={root}",
              "-DCOMPRESSOR_PLUGIN_HEADERS_ONLY=ON"],
             ["cmake", "--build", str(tmp_path)],
             [str(tmp_path / "compressor_moe_plugin_smoke")]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "moe_plugin_smoke: ok" in res.stdout
    syms = subprocess.run(["nm", "-D", "--defined-only", str(tmp_path / "libcompressor_moe_plugin.so")],
                          capture_output=True, text=True).stdout.split()
    assert "getCreators" in syms and "setLoggerFinder" in syms
