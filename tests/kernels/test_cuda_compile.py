"""The MoE CUDA kernels compile for sm_90 with the nvcc on this machine (no GPU is needed to compile).

The torch binding (kernels/csrc/moe_torch_binding.cpp) is not compiled here: it needs torch's CUDA headers,
which a CPU build of torch lacks; scripts/gpu_check_moe.py builds and runs it on a GPU machine."""

from __future__ import annotations

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
