"""Small standalone SVG charts (line and bar) for rho's HTML reports and docs: no plotting library,
no scripts, nothing external, so a report file opens anywhere and a chart can be committed as .svg."""

from __future__ import annotations

import html
import math

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f", "#e377c2",
           "#bcbd22")


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               width: int = 700, height: int = 360, styles: dict[str, str] | None = None,
               y_range: tuple[float, float] | None = None, colours: dict[str, str] | None = None) -> str:
    """An SVG line chart of named (x, y) series; ``styles[name] = "dashed"`` draws a dashed line;
    ``colours[name]`` fixes a series' colour (else the palette's, in order)."""
    styles = styles or {}
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="4" y="20">{html.escape(title)}: no data</text></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = y_range if y_range else (min(p[1] for p in pts), max(p[1] for p in pts))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 60, 190, 30, 45
    pw, ph = width - left - right, height - top - bottom
    # the legend gets the room its longest name needs (~7 px a character at 12 px): the chart widens
    right = max(right, 48 + 7 * max(len(name) for name in series))
    width = left + pw + right

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'font-family="sans-serif" font-size="12" role="img" aria-label="{html.escape(title)}">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    for t in _nice_ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _nice_ticks(x0, x1):
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#333"/>'
                     f'<text x="{sx(t):.1f}" y="{top + ph + 17}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>')
    for i, (name, s) in enumerate(series.items()):
        colour = (colours or {}).get(name) or PALETTE[i % len(PALETTE)]
        # past the palette, colours repeat dashed so that no two series look the same
        dashed = styles.get(name) == "dashed" or (i // len(PALETTE)) % 2 == 1
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if math.isfinite(y))
        if path:
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}>'
                         f'<title>{html.escape(name)}</title></polyline>')
        ly = top + 14 + i * 18
        parts.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 34}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"{dash}/>'
                     f'<text x="{left + pw + 40}" y="{ly}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(bars: dict[str, float], title: str, ylabel: str, width: int = 480, height: int = 260,
              y_max: float | None = None, fmt: str = "{:.0%}", colours: dict[str, str] | None = None) -> str:
    """An SVG bar chart of named values (e.g. the kept fraction per token kind)."""
    left, right, top, bottom = 50, 10, 30, 40
    pw, ph = width - left - right, height - top - bottom
    top_value = y_max if y_max is not None else max([v for v in bars.values() if math.isfinite(v)] + [1e-12])
    bw = pw / max(len(bars), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'font-family="sans-serif" font-size="12" role="img" aria-label="{html.escape(title)}">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
             f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>']
    for i, (name, v) in enumerate(bars.items()):
        h = 0.0 if not math.isfinite(v) else ph * min(v / top_value, 1.0)
        x = left + i * bw + bw * 0.15
        parts.append(f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{bw * 0.7:.1f}" height="{h:.1f}" fill="{(colours or {}).get(name, PALETTE[i % len(PALETTE)])}">'
                     f'<title>{html.escape(name)}: {fmt.format(v)}</title></rect>'
                     f'<text x="{x + bw * 0.35:.1f}" y="{top + ph - h - 4:.1f}" text-anchor="middle">{fmt.format(v)}</text>'
                     f'<text x="{x + bw * 0.35:.1f}" y="{top + ph + 16:.1f}" text-anchor="middle">{html.escape(name)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#333"/></svg>')
    return "".join(parts)
