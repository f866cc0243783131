"""The installed distribution exposes one top-level package, `compressor`, and registers its passes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import distribution, entry_points

from tests.conftest import REPO


def test_wheel_has_only_compressor_at_top_level(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("compressor-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"compressor"}, top
    # The design card's folders are inside the one namespace.
    for sub in ("passes/quantize/rtn.py", "passes/lower/export_onnx.py", "calibration/data.py", "eval/metrics.py",
                "kernels/qlinear.py"):
        assert f"compressor/{sub}" in names, sub
    # The plugin sources travel as package data (build_engine copies them next to build.sh).
    for src in ("CMakeLists.txt", "csrc/moe_kernels.cu", "csrc/moe_kernels.h", "plugins/moe_plugin.cpp",
                "plugins/moe_plugin.h"):
        assert f"compressor/kernels/src/{src}" in names, src
    # transformers probes for a top-level `kernels` package: there must be none.
    assert not any(n.startswith(("kernels/", "passes/", "eval/", "calibration/")) for n in names)


def test_console_script_and_pass_entry_points():
    dist = distribution("compressor")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"compress": "compressor.cli:entry"}
    passes = {ep.name for ep in entry_points(group="compressor.passes")}
    assert {"quantize_rtn", "export_checkpoint", "export_onnx"} <= passes


def test_no_optimum_dependency():
    requires = distribution("compressor").requires or []
    assert not any(r.lower().startswith("optimum") for r in requires)
