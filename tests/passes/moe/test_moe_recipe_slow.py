"""The shipped MoE trim recipe on the trained Mixtral fixture (asset:moe-mixtral-fixture, trained into
$COMPRESSOR_HOME on first use: a few minutes; then reused). Marked slow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_shipped_trim_recipe_on_the_trained_fixture(tmp_path):
    """Trains asset:moe-mixtral-fixture once if it is not cached (minutes), then runs the shipped REAP recipe."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "compressor", REPO / "recipes/moe-trim-reap.yaml", "--target", "h200",
                          "--out", out, "--json", "--quiet"], capture_output=True, text=True, timeout=1500, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    trim = next(p for p in report["passes"] if p["name"] == "expert_trim")["info"]
    assert trim["experts_before"] == 8 and trim["experts_after"] == 6 and trim["predicted_risk"] == "low"
    stats = next(p for p in report["passes"] if p["name"] == "expert_stats")["info"]
    # Non-uniform routing: in every layer the busiest expert gets over 10x the tokens of the idlest one (measured:
    # 40x to all-vs-none) and over 1.5x its uniform share (1/8 of the slots; measured 0.26-0.36).
    for share in stats["heatmap"]["token_share"]:
        assert max(share) > 10 * min(share) and max(share) > 1.5 / 8
    assert all(g["passed"] for g in report["gates"])
    assert report["result"]["metrics"]["model_bytes"] < 0.85 * report["baseline"]["metrics"]["model_bytes"]
