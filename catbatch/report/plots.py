"""Inline SVG plots for the HTML report (no plotting or JS libraries)."""

from __future__ import annotations

import math
from html import escape
from typing import Any

import numpy as np

from catbatch.report.fmt import macs_unit

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, LEFT, RIGHT, TOP = 640, 130, 20, 20
MAX_POINTS = 400


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _svg(height: int, body: list[str], title: str) -> str:
    return (
        f'<svg class="plot" role="img" viewBox="0 0 {W} {height}" width="{W}" height="{height}">'
        f"<title>{escape(title)}</title>" + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, s: str, anchor: str = "start", cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{c}>{escape(s)}</text>'


def _empty(title: str, message: str) -> str:
    return _svg(60, [_text(W / 2, 35, message, "middle", "muted")], title)


def _x_axis(ticks: list[float], sx, y: float, label: str, fmt: str = "{:g}") -> list[str]:
    out = [f'<line x1="{LEFT}" y1="{y}" x2="{W - RIGHT}" y2="{y}" class="axis"/>']
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" class="axis"/>')
        out.append(_text(x, y + 16, fmt.format(t), "middle"))
    out.append(_text((LEFT + W - RIGHT) / 2, y + 32, label, "middle"))
    return out


def latency_plot(latencies: dict[str, list[float]]) -> str:
    """Per variant: box (p25-p75, median) with p5-p95 whiskers over the per-image latencies."""
    title = "Latency per image (s), warm-up excluded"
    data = {n: np.asarray(v) for n, v in latencies.items() if v}
    if not data:
        return _empty(title, "no latencies")
    hi = max(float(v.max()) for v in data.values())
    ticks = nice_ticks(0.0, hi * 1.05)
    span = ticks[-1] or 1.0

    def sx(v: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * v / span

    row_h = 44
    height = TOP + row_h * len(latencies) + 45
    body = []
    for i, (name, values) in enumerate(latencies.items()):
        y = TOP + i * row_h + row_h / 2
        body.append(_text(LEFT - 8, y + 4, name, "end"))
        if not values:
            body.append(_text(LEFT + 4, y + 4, "no data", cls="muted"))
            continue
        v = np.asarray(values)
        p5, p25, p50, p75, p95 = np.percentile(v, [5, 25, 50, 75, 95])
        c = color(i)
        step = max(1, len(v) // MAX_POINTS)
        for j, x in enumerate(v[::step]):
            jitter = ((j * 7919) % 17 - 8) * 1.0
            body.append(
                f'<circle cx="{sx(x):.1f}" cy="{y + jitter:.1f}" r="2" fill="{c}" '
                'fill-opacity="0.35"/>'
            )
        body += [
            f'<line x1="{sx(p5):.1f}" y1="{y}" x2="{sx(p95):.1f}" y2="{y}" stroke="{c}"/>',
            f'<rect x="{sx(p25):.1f}" y="{y - 10}" width="{max(1.0, sx(p75) - sx(p25)):.1f}" '
            f'height="20" fill="none" stroke="{c}" stroke-width="2"/>',
            f'<line x1="{sx(p50):.1f}" y1="{y - 10}" x2="{sx(p50):.1f}" y2="{y + 10}" '
            f'stroke="{c}" stroke-width="3"/>',
        ]
    body += _x_axis(ticks, sx, TOP + row_h * len(latencies) + 4, "seconds per image")
    return _svg(height, body, title)


def clip_macs_plot(data: dict[str, Any]) -> str:
    """CLIP mean (with its 95% interval) against mean MACs, one point per variant."""
    title = "CLIP score against MACs per image"
    points = []
    for i, name in enumerate(data["variants_order"]):
        v = data["variants"][name]
        macs, clip = v["macs"]["paper"], v.get("clip")
        if macs and clip:
            lo, hi = clip.get("ci95") or (clip["mean"], clip["mean"])
            points.append((name, i, macs["mean"], clip["mean"], lo, hi))
    if not points:
        return _empty(title, "no variant has both MACs and CLIP scores in this output")
    scale, unit = macs_unit([p[2] for p in points])
    xs = [p[2] / scale for p in points]
    ys = [y for p in points for y in p[3:6]]
    xt = nice_ticks(0.0, max(xs) * 1.1)
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.15 or 1.0
    yt = nice_ticks(y_lo - pad, y_hi + pad)
    height, bottom = 300, 300 - 45

    def sx(v: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * v / (xt[-1] or 1.0)

    def sy(v: float) -> float:
        return bottom - (bottom - TOP) * (v - yt[0]) / ((yt[-1] - yt[0]) or 1.0)

    body = [f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" class="axis"/>']
    for t in yt:
        body.append(_text(LEFT - 6, sy(t) + 4, f"{t:g}", "end"))
        body.append(
            f'<line x1="{LEFT}" y1="{sy(t):.1f}" x2="{W - RIGHT}" y2="{sy(t):.1f}" class="grid"/>'
        )
    body.append(_text(16, (TOP + bottom) / 2, "CLIP", "middle"))
    for (name, i, _, mean, lo, hi), x in zip(points, xs, strict=True):
        c = color(i)
        body += [
            f'<line x1="{sx(x):.1f}" y1="{sy(lo):.1f}" x2="{sx(x):.1f}" y2="{sy(hi):.1f}" '
            f'stroke="{c}" stroke-width="2"/>',
            f'<circle cx="{sx(x):.1f}" cy="{sy(mean):.1f}" r="5" fill="{c}"/>',
            _text(sx(x) + 8, sy(mean) - 6, name),
        ]
    body += _x_axis(xt, sx, bottom, f"MACs per image ({unit or 'MACs'})")
    return _svg(height, body, title)


def speedup_plot(data: dict[str, Any]) -> str:
    """Speed-up against the baseline per variant, with a line at 1x."""
    title = "Speed-up against the baseline"
    bars = [
        (name, i, (data["variants"][name].get("vs_baseline") or {}).get("speedup"))
        for i, name in enumerate(data["variants_order"])
    ]
    if not any(s for _, _, s in bars):
        return _empty(title, "no speed-up: no baseline or no latencies")
    ticks = nice_ticks(0.0, max(s or 0.0 for _, _, s in bars) * 1.1)

    def sx(v: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * v / (ticks[-1] or 1.0)

    row_h = 30
    bottom = TOP + row_h * len(bars)
    body = []
    for name, i, s in bars:
        y = TOP + (list(data["variants_order"]).index(name)) * row_h
        body.append(_text(LEFT - 8, y + 19, name, "end"))
        if s is None:
            body.append(_text(LEFT + 4, y + 19, "no data", cls="muted"))
            continue
        body += [
            f'<rect x="{LEFT}" y="{y + 5}" width="{max(1.0, sx(s) - LEFT):.1f}" height="20" '
            f'fill="{color(i)}"/>',
            _text(sx(s) + 4, y + 19, f"{s:.2f}×"),
        ]
    body.append(
        f'<line x1="{sx(1.0):.1f}" y1="{TOP}" x2="{sx(1.0):.1f}" y2="{bottom}" class="ref"/>'
    )
    body += _x_axis(ticks, sx, bottom + 4, "speed-up (×)")
    return _svg(bottom + 45, body, title)
