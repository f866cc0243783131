"""report.json (schema version 1, see ARCHITECTURE.md) and a human-readable report.md beside it."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_SCHEMA_VERSION = 1


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:.{digits}g} ({v['min']:.{digits}g}-{v['max']:.{digits}g}, n={v['n']})"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _delta(base, res) -> str:
    b = base.get("median") if isinstance(base, dict) else base
    r = res.get("median") if isinstance(res, dict) else res
    if not isinstance(b, (int, float)) or not isinstance(r, (int, float)) or not b:
        return "-"
    return f"{(r - b) / abs(b) * 100:+.2f}%"


def render_markdown(report: dict) -> str:
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    lines = [f"# compressor report: {report['recipe']['name']}", "",
             f"- model: `{report['model']['source']}` ({report['model'].get('parameters', 0) / 1e6:.1f}M parameters)",
             f"- target: **{report['target']}**",
             f"- passes: {', '.join(p['name'] for p in report['passes']) or 'none'}",
             f"- compress time: {report['result']['metrics'].get('compress_seconds', 0):.1f} s; "
             f"peak RSS {report['result']['metrics'].get('peak_rss_mb', 0):.0f} MB", ""]
    lines += ["## Quality (measured, torch CPU)", "", "| eval set | metric | baseline | result | change |",
              "|---|---|---|---|---|"]
    for name, rs in r.get("eval_sets", {}).items():
        bs = b["eval_sets"][name]
        lines.append(f"| {name} | perplexity | {bs['perplexity']:.4f} | {rs['perplexity']:.4f} | "
                     f"{_delta(bs['perplexity'], rs['perplexity'])} |")
        lines.append(f"| {name} | KL divergence (nats/token) | 0 | {rs['kl_divergence']:.5f} | |")
        lines.append(f"| {name} | top-1 agreement | 1 | {rs['top1_agreement']:.4f} | |")
        lines.append(f"| {name} | tokens evaluated | {bs['tokens']} | {rs['tokens']} | |")
    lines += ["", "## Cost (measured)", "", "| metric | baseline | result | change | backend |", "|---|---|---|---|---|"]
    lines.append(f"| model bytes | {b.get('model_bytes', 0) / 1e6:.1f} MB | {r.get('model_bytes', 0) / 1e6:.1f} MB | "
                 f"{_delta(b.get('model_bytes'), r.get('model_bytes'))} | weights as stored |")
    for m, what in (("parameters", "unique tensors"), ("nonzero_parameters", "weights not pruned")):
        if m in r:
            lines.append(f"| {m.replace('_', ' ')} | {b[m] / 1e6:.2f}M | {r[m] / 1e6:.2f}M | {_delta(b[m], r[m])} | {what} |")
    for m in ("latency_ms_prefill", "latency_ms_decode", "tokens_per_s"):
        if m in r or m in b:
            backend = r.get("latency", {}).get("backend", "onnxruntime") + " " + str(r.get("latency", {}).get("device", ""))
            lines.append(f"| {m} | {_fmt(b.get(m))} | {_fmt(r.get(m))} | {_delta(b.get(m, {}), r.get(m, {}))} | {backend} |")
    if "latency" in r:
        lat = r["latency"]
        lines.append(f"\nLatency: batch 1, prompt {lat['prompt_len']} tokens, {lat['decode_tokens']} decode steps, "
                     f"median of {lat['latency_ms_decode']['n']} repetitions (min-max in brackets), baseline and result "
                     f"interleaved in one run, threads "
                     f"{lat['threads']}.")
    mb, mr = b.get("modeled"), r.get("modeled")
    if mr:
        lines += ["", f"## Cost on {mr['target']} (MODELED, roofline; not measured)", "",
                  "| batch | baseline tok/s | result tok/s | baseline $/Mtok | result $/Mtok | bound | memory GB |",
                  "|---|---|---|---|---|---|---|"]
        for pb, pr in zip(mb["points"], mr["points"]):
            usd = lambda p: f"{p['usd_per_mtok']:.4f}" if p["usd_per_mtok"] is not None else "-"  # noqa: E731
            lines.append(f"| {pr['batch']} | {pb['tokens_per_s']:.0f} | {pr['tokens_per_s']:.0f} | {usd(pb)} | "
                         f"{usd(pr)} | {pr['bound']} | {pr['memory_gb']:.2f} |")
        lines.append(f"\nModeled at context {mr['points'][0]['context']} tokens, {mr['bandwidth_efficiency']:.0%} of peak "
                     f"bandwidth, weights served in BF16 unless quantized, price "
                     f"${mr['points'][0]['usd_per_hour']}/GPU-hour.")
    if report["gates"]:
        lines += ["", "## Gates", "", "| gate | limit | measured | verdict |", "|---|---|---|---|"]
        for g in report["gates"]:
            name = g["metric"] + (f" ({g['eval_set']})" if g.get("eval_set") else "")
            verdict = "pass" if g["passed"] else f"**FAIL**: {g.get('reason', '')}"
            lines.append(f"| {name} | {g['kind']} {g['limit']} | {_fmt(g.get('measured'))} | {verdict} |")
    lines += ["", "## Artifacts", "", "| kind | path | bytes | sha256 |", "|---|---|---|---|"]
    for a in report["artifacts"]:
        lines.append(f"| {a['kind']} | {a['path']} | {a['bytes']:,} | `{a['sha256'][:16]}` |")
    if "perplexity" in b and "perplexity" in r:
        lines.append("\n![perplexity vs size](quality_vs_size.svg)")
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def write(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    (folder / "report.md").write_text(render_markdown(report))
    b, r = report["baseline"]["metrics"], report["result"]["metrics"]
    if "perplexity" in b and "perplexity" in r:
        from compressor.eval.plot import scatter_svg

        pts = [{"name": "baseline", "mb": b["model_bytes"] / 1e6, "ppl": b["perplexity"]},
               {"name": report["recipe"]["name"], "mb": r["model_bytes"] / 1e6, "ppl": r["perplexity"]}]
        first = next(iter(r.get("eval_sets", {"": None})))
        (folder / "quality_vs_size.svg").write_text(scatter_svg(
            pts, "mb", "ppl", title=f"{report['recipe']['name']}: perplexity vs size",
            x_label="model MB (weights as stored)", y_label=f"perplexity ({first}, held out)"))
