"""Dependency-free SVG scatter plots for reports and benchmarks (quality against cost)."""

from __future__ import annotations

from html import escape


def scatter_svg(points: list[dict], x: str, y: str, label: str = "name", title: str = "",
                x_label: str | None = None, y_label: str | None = None, width: int = 640, height: int = 420) -> str:
    """points: [{label: ..., x: ..., y: ...}] -> SVG text. Axes are linear, padded 10% around the data."""
    xs = [float(p[x]) for p in points]
    ys = [float(p[y]) for p in points]
    if not points:
        raise ValueError("nothing to plot")
    left, right, top, bottom = 70, 20, 40, 50

    def span(vals):
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)

    def px(v):
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def py(v):
        return height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for i in range(5):
        vx = x0 + (x1 - x0) * i / 4
        vy = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{px(vx):.1f}" y="{height - bottom + 16}" text-anchor="middle">{vx:.3g}</text>')
        out.append(f'<text x="{left - 6}" y="{py(vy) + 4:.1f}" text-anchor="end">{vy:.3g}</text>')
        out.append(f'<line x1="{left}" y1="{py(vy):.1f}" x2="{width - right}" y2="{py(vy):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{escape(x_label or x)}</text>')
    out.append(f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(top + height - bottom) / 2})">{escape(y_label or y)}</text>')
    for p, vx, vy in zip(points, xs, ys):
        out.append(f'<circle cx="{px(vx):.1f}" cy="{py(vy):.1f}" r="5" fill="#1f77b4"/>')
        # Labels of points near the right edge extend leftwards, so they are not cut off.
        right_side = px(vx) > 0.7 * width
        tx, anchor = (px(vx) - 8, "end") if right_side else (px(vx) + 8, "start")
        out.append(f'<text x="{tx:.1f}" y="{py(vy) - 8:.1f}" text-anchor="{anchor}">{escape(str(p[label]))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The Pareto plot of a report: quality against cost per variant, the baseline marked (matplotlib, Agg, no pyplot).

BASELINE_COLOR = "#d62728"
VARIANT_COLOR = "#1f77b4"
CHEAPEST_COLOR = "#2ca02c"


def cost_axis(report: dict):
    """(label, getter(metrics) -> cost or None): modeled $/Mtok at the first batch on a GPU target, else the
    measured decode latency, else the bytes as stored."""
    r = report["result"]["metrics"]
    if r.get("modeled"):
        m = r["modeled"]
        p = m["points"][0]
        return (f"$ per million tokens, MODELED on {m['target']} (batch {p['batch']}, context {p['context']})",
                lambda x: (x.get("modeled") or {}).get("points", [{}])[0].get("usd_per_mtok"))
    if isinstance(r.get("latency_ms_decode"), dict):
        lat = r.get("latency", {})
        return (f"decode ms/token, measured ({lat.get('backend', '')} {lat.get('device', '')}, batch 1, median)",
                lambda x: (x.get("latency_ms_decode") or {}).get("median"))
    return "model MB (weights as stored)", lambda x: x["model_bytes"] / 1e6 if x.get("model_bytes") else None


def pareto_points(report: dict) -> tuple[list[dict], str, str]:
    """[{name, cost, quality, low, high, baseline}] with the axis labels."""
    x_label, cost = cost_axis(report)
    sets = report["result"]["metrics"].get("eval_sets", {})
    first = next(iter(sets), None)
    encoder = "embedding_cosine" in report["result"]["metrics"]
    if encoder:  # quality is 1 - mean cosine to the original's embeddings (the original: 0), interval flipped
        y_label = f"1 - embedding cosine to the original ({first}, held out; lower is better)"
    else:
        y_label = f"perplexity ({first}, held out; lower is better)" if first else "perplexity"
    pts = []

    def add(name, metrics, iv, is_base, v=None):
        c, q = cost(metrics), metrics.get("perplexity")
        if encoder:
            q = 0.0 if is_base else (1.0 - metrics["embedding_cosine"] if "embedding_cosine" in metrics else None)
            e = ((metrics.get("eval_sets") or {}).get(first) or {}).get("embedding_intervals", {})
            e = e.get("embedding_cosine")
            iv = {"low": 1.0 - e["high"], "high": 1.0 - e["low"]} if e else None
        if c is None or q is None:
            return
        v = v or {}
        pts.append({"name": name, "cost": float(c), "quality": float(q), "baseline": is_base,
                    "low": iv["low"] if iv else None, "high": iv["high"] if iv else None,
                    # sweeps: the variant passes every gate / is the cheapest that does
                    "passed": v.get("passed"), "cheapest": bool(v.get("cheapest_passing"))})

    b = report["baseline"]["metrics"]
    add("baseline", b, (b.get("intervals") or {}).get("perplexity"), True)
    for v in report.get("variants") or [{"name": report["recipe"]["name"], "metrics": report["result"]["metrics"]}]:
        if v.get("metrics"):  # a sweep's skipped or failed variants have none
            add(v["name"], v["metrics"], (v["metrics"].get("intervals") or {}).get("perplexity"), False, v)
    return pts, x_label, y_label


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both cost and quality (lower is better on both), by cost."""
    front = [p for p in points if not any(o["cost"] <= p["cost"] and o["quality"] <= p["quality"]
                                          and (o["cost"], o["quality"]) != (p["cost"], p["quality"]) for o in points)]
    return sorted(front, key=lambda p: p["cost"])


def pareto_figure(points: list[dict], x_label: str, y_label: str, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    ax = fig.add_subplot()
    if not points:
        ax.text(0.5, 0.5, "no quality measured (the recipe has no eval section)", ha="center", va="center")
        ax.set_axis_off()
    else:
        front = pareto_front(points)
        if len(front) > 1:
            ax.step([p["cost"] for p in front], [p["quality"] for p in front], where="post", color="#999",
                    linestyle="--", linewidth=1, label="Pareto front")
        for p in points:
            color = BASELINE_COLOR if p["baseline"] else VARIANT_COLOR
            yerr = None
            if p["low"] is not None:
                yerr = [[p["quality"] - p["low"]], [p["high"] - p["quality"]]]
            failed = p.get("passed") is False  # a sweep variant that fails a gate: hollow marker
            ax.errorbar([p["cost"]], [p["quality"]], yerr=yerr, fmt="*" if p["baseline"] else "o", color=color,
                        markersize=16 if p["baseline"] else 10, capsize=4, mfc="white" if failed else color,
                        label=p["name"] + (" (fails a gate)" if failed else ""))
            label = p["name"] + (" (cheapest passing)" if p.get("cheapest") else "")
            ax.annotate(label, (p["cost"], p["quality"]), textcoords="offset points", xytext=(8, 8), fontsize=9,
                        fontweight="bold" if p.get("cheapest") else "normal")
            if p.get("cheapest"):
                ax.plot([p["cost"]], [p["quality"]], "o", markersize=20, mfc="none", mec=CHEAPEST_COLOR, mew=2.5,
                        label="cheapest variant passing the gates")
        ax.margins(0.2)
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(y_label, fontsize=9)
        ax.grid(True, color="#eee")
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def write_pareto(report: dict, png_path) -> str:
    """Write pareto.png; return the same figure as SVG text (for report.html). Deterministic bytes."""
    import io

    import matplotlib

    points, x_label, y_label = pareto_points(report)
    title = f"{report['recipe']['name']}: quality vs cost (error bars: bootstrap interval)"
    with matplotlib.rc_context({"svg.hashsalt": "compressor", "svg.fonttype": "path"}):
        fig = pareto_figure(points, x_label, y_label, title)
        fig.savefig(png_path, format="png", metadata={"Software": None})
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # inline: without the XML prolog and doctype
