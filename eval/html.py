"""report.html: one self-contained file (inline CSS, the Pareto plot as inline SVG, no script, nothing fetched),
built from the same tables as report.md (eval/report.py)."""

from __future__ import annotations

import re
from html import escape

from compressor.eval import report as rep

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222;
  padding:0 1em;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
code{font-family:ui-monospace,monospace;font-size:.92em}
.fail{color:#b00020;font-weight:bold}.pass{color:#1b7f2a}
.modeled{background:#fff6e0;border:1px solid #e8c36a;padding:.1em .4em;border-radius:3px;font-weight:bold}
.note{color:#555;font-size:.9em}.plot svg{max-width:100%;height:auto}
.bar{display:inline-block;height:.8em;background:#1f77b4;vertical-align:middle}
"""


def _cell(text: str) -> str:
    """The cells use a little Markdown (**bold**, `code`): escape, then render those two."""
    s = escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", lambda m: f'<span class="{"fail" if m[1] == "FAIL" else "b"}">{m[1]}</span>', s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    if s == "pass":
        s = '<span class="pass">pass</span>'
    return s


def table(t: rep.Table, cls: str = "") -> str:
    head, rows = t
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</tbody></table>"


def _para(text: str | None, cls: str = "note") -> str:
    return f'<p class="{cls}">{_cell(text)}</p>' if text else ""


def per_layer_section(report: dict) -> str:
    """Per-layer weight SQNR where a pass reports it (worst first, with a bar), else the per-pass summary."""
    parts = []
    summary = rep.sqnr_summary_table(report)
    if summary:
        parts.append(table(summary))
    for p in report["passes"]:
        layers = rep.per_layer_sqnr(p.get("info", {}))
        if not layers:
            continue
        top = max(layers.values()) or 1.0
        rows = "".join(f'<tr><td><code>{escape(n)}</code></td><td>{v:.2f}</td><td><span class="bar" '
                       f'style="width:{max(v, 0) / top * 200:.0f}px"></span></td></tr>'
                       for n, v in sorted(layers.items(), key=lambda kv: kv[1]))
        parts.append(f"<h3>{escape(p['name'])}: weight SQNR per layer (dB, worst first)</h3>"
                     f'<table id="sqnr-{escape(p["name"])}"><thead><tr><th>layer</th><th>SQNR dB</th><th></th></tr>'
                     f"</thead><tbody>{rows}</tbody></table>")
    if not parts:
        return '<p class="note">No pass in this run reports weight quantization error.</p>'
    return "\n".join(parts)


def render_html(report: dict, plot_svg: str) -> str:
    r = report["result"]["metrics"]
    name = escape(report["recipe"]["name"])
    gates = report["gates"]
    failed = [g for g in gates if not g["passed"]]
    verdict = (f'<span class="fail">{len(failed)} of {len(gates)} gates FAILED</span>' if failed else
               f'<span class="pass">all {len(gates)} gate{"s" if len(gates) > 1 else ""} pass</span>' if gates
               else "no gates")
    body = [f"<h1>compressor report: {name}</h1>",
            "<ul>",
            f"<li>model: <code>{escape(report['model']['source'])}</code> "
            f"({report['model'].get('parameters', 0) / 1e6:.1f}M parameters, {escape(report['model'].get('architecture', ''))})</li>",
            f"<li>target: <b>{escape(report['target'])}</b></li>",
            f"<li>passes: {escape(', '.join(p['name'] for p in report['passes']) or 'none')}</li>",
            f"<li>compress time {r.get('compress_seconds', 0):.1f} s; peak RSS {r.get('peak_rss_mb', 0):.0f} MB</li>",
            f"<li>gates: {verdict}</li></ul>",
            ]
    st = rep.sweep_table(report)
    if st:
        body += ["<h2>Sweep</h2>", table(st, "sweep")] + [_para(n) for n in rep.sweep_notes(report)]
        if report["sweep"].get("result"):
            body.append(f"<h2>Result: {escape(report['sweep']['result'])}</h2>")
    body += ["<h2>Quality (measured, torch CPU)</h2>"]
    body.append(table(rep.quality_table(report), "quality") if r.get("eval_sets") else
                '<p class="note">No eval section: quality not measured.</p>')
    body.append(_para(rep.interval_note(report)))
    body += ['<h2>Quality vs cost</h2>', f'<div class="plot" id="pareto">{plot_svg}</div>',
             '<p class="note">The same figure is pareto.png beside this file. Stars mark the baseline; error bars are '
             'the bootstrap intervals of perplexity; a cost axis labelled MODELED is the roofline, not a measurement.</p>']
    body += ["<h2>Cost (measured)</h2>", table(rep.measured_cost_table(report)), _para(rep.latency_note(report))]
    tt = rep.throughput_table(report)
    if tt:
        body += ["<h3>Throughput (measured)</h3>", table(tt, "throughput")]
    mt = rep.modeled_table(report)
    if mt:
        body += [f'<h2>Cost on {escape(r["modeled"]["target"])} <span class="modeled">MODELED</span> '
                 "(roofline; not measured)</h2>", table(mt, "modeled-cost")]
        body += [_para(n) for n in rep.modeled_notes(report)]
    gt = rep.gate_table(report)
    if gt:
        body += ["<h2>Gates</h2>", table(gt, "gates")]
    body += ["<h2>Weight quantization error</h2>", per_layer_section(report)]
    body += ["<h2>Artifacts</h2>", table(rep.artifact_table(report))]
    if report.get("notes"):
        body += ["<h2>Notes</h2>", "<ul>"] + [f"<li>{escape(n)}</li>" for n in report["notes"]] + ["</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>compressor report: {name}"
            f"</title><style>{CSS}</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n")
