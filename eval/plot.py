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
