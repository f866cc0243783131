"""Every run writes report.json, report.md, report.html and pareto.png; the HTML is self-contained and renders in
a real headless Chromium (Debian's) with the plot and without console errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from compressor.eval import html, plot
from tests.conftest import tiny_eval, write_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium; "
                                                              "scripts/install.sh does it)")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, text_dir):
    """One real run of the tiny model: INT4 g32 RTN, modeled on h200, two gates (one at 95% confidence)."""
    tmp = tmp_path_factory.mktemp("html")
    recipe = write_recipe(tmp / "recipe.yaml", f"""
schema_version: 1
name: tiny-w4
seed: 5
model: {{source: {tiny_model_dir}}}
passes:
  - {{pass: quantize_rtn, format: int4, granularity: per_group, group_size: 32}}
export: []
{tiny_eval(text_dir, "{enabled: false}")}
  intervals: {{level: 0.9, resamples: 1000}}
  usd_per_hour: 3.25
gates:
  - {{metric: perplexity, max_increase_pct: 50}}
  - {{metric: perplexity, max_increase_pct: 50, confidence: 0.95}}
""")
    from compressor.cli import main

    out = tmp / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESSOR_HOME", str(tmp / "home"))
        assert main([str(recipe), "--target", "h200", "--out", str(out), "--quiet"]) == 0
    return out / "report"


def test_run_writes_all_report_forms_with_intervals(run):
    from PIL import Image

    assert {"report.json", "report.md", "report.html", "pareto.png"} <= {p.name for p in run.iterdir()}
    report = json.loads((run / "report.json").read_text())
    r, b = report["result"]["metrics"], report["baseline"]["metrics"]
    assert r["bootstrap"] == {"level": 0.9, "resamples": 1000, "seed": 5, "method": "paired percentile bootstrap "
                              "over eval windows"}
    s = r["eval_sets"]["local"]
    iv = s["intervals"]
    assert iv["windows"] == 4 == len(s["window_top1"]) and sum(s["window_top1"]) == round(s["top1_agreement"] * 252)
    assert iv["perplexity"]["value"] == pytest.approx(s["perplexity"])
    assert iv["perplexity_baseline"]["value"] == pytest.approx(b["perplexity"])
    assert iv["perplexity_delta_pct"]["value"] == pytest.approx((s["perplexity"] / b["perplexity"] - 1) * 100)
    assert iv["kl_divergence"]["low"] <= s["kl_divergence"] <= iv["kl_divergence"]["high"]
    assert r["intervals"] == iv and b["eval_sets"]["local"]["intervals"]["perplexity"] == iv["perplexity_baseline"]
    g = report["gates"][1]
    assert g["confidence"] == 0.95 and g["bound"] > g["measured"] and g["passed"]
    assert r["modeled"]["price"] == {"usd_per_hour": 3.25, "source": "recipe/command line"}
    assert r["modeled"]["crossover_batch"]["weights_only"] < b["modeled"]["crossover_batch"]["weights_only"]
    md = (run / "report.md").read_text()
    assert "90% intervals, paired percentile bootstrap" in md and "upper 95%" in md and "pareto.png" in md
    png = Image.open(run / "pareto.png")
    assert png.format == "PNG" and png.size == (750, 480)
    page = (run / "report.html").read_text()
    # Self-contained: inline CSS and SVG, no script, nothing fetched.
    assert "<style>" in page and '<div class="plot" id="pareto"><svg' in page
    assert "<script" not in page and "<link" not in page and 'src="http' not in page and "<img" not in page
    assert page.count('<span class="modeled">MODELED</span>') == 1 and "all 2 gates pass" in page
    assert "model.layers.0" in page  # the worst layer of the SQNR summary


def _chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", "--disable-sync",
                           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", *extra,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    """Console messages and uncaught exceptions Chromium logged (the report has no script: any is an error)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@needs_chromium
def test_html_renders_in_chromium_with_plot_and_no_console_errors(run, tmp_path):
    from PIL import Image

    page = run / "report.html"
    dom = _chromium(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_errors(dom.stderr) == [], dom.stderr
    text = dom.stdout
    assert '<div class="plot" id="pareto"><svg' in text and "Quality (measured, torch CPU)" in text
    assert text.count("<table") >= 5  # quality, measured, modeled, gates, SQNR, artifacts

    shot = tmp_path / "page.png"
    res = _chromium(page, tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", "--hide-scrollbars")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert console_errors(res.stderr) == []
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    count = {c: n for n, c in colors}

    def rgb(h):
        return tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))

    # The plot is drawn: the baseline star and the variant's marker in their own colours.
    assert count.get(rgb(plot.BASELINE_COLOR), 0) > 100 and count.get(rgb(plot.VARIANT_COLOR), 0) > 100


@needs_chromium
def test_console_error_check_catches_a_broken_page(run, tmp_path):
    """The check above would see a script error: the same report with a failing script is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text((run / "report.html").read_text().replace("</body>", "<script>notDefined();</script></body>"))
    res = _chromium(bad, tmp_path, "--dump-dom")
    assert any("notDefined" in ln for ln in console_errors(res.stderr)), res.stderr


def test_per_layer_sqnr_table_worst_first(run):
    report = json.loads((run / "report.json").read_text())
    report["passes"][0]["info"]["sqnr_db"] = {"model.layers.1.mlp.up_proj": 30.5, "model.layers.0.self_attn.q_proj":
                                              12.25, "lm_head": 21.0}
    page = html.render_html(report, "<svg></svg>")
    table = page[page.index('id="sqnr-quantize_rtn"'):]
    order = [table.index(n) for n in ("model.layers.0.self_attn.q_proj", "lm_head", "model.layers.1.mlp.up_proj")]
    assert order == sorted(order) and "<td>12.25</td>" in table
    # A pass without per-layer figures keeps the per-pass summary only.
    report["passes"][0]["info"].pop("sqnr_db")
    assert 'id="sqnr-' not in html.render_html(report, "<svg></svg>")


def test_pareto_front_and_axis():
    pts = [{"name": "base", "cost": 4.0, "quality": 10.0}, {"name": "int8", "cost": 2.0, "quality": 10.1},
           {"name": "bad", "cost": 3.0, "quality": 10.5}, {"name": "int4", "cost": 1.0, "quality": 11.0}]
    assert [p["name"] for p in plot.pareto_front(pts)] == ["int4", "int8", "base"]
