"""SVG line charts for the benchmark report (standard library only)."""

import math
import os
from xml.sax.saxutils import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]


def nice_max(v):
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * mag:
            return m * mag
    return 10 * mag


def chart(path, title, xlabel, ylabel, series, logx=False, w=640, h=360):
    """series: [(name, [(x, y), ...])]. Writes an SVG line chart."""
    left, right, top, bottom = 70, 20, 40, 50
    pw, ph = w - left - right, h - top - bottom
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    if not xs:
        return
    fx = (lambda x: math.log2(x)) if logx else (lambda x: x)
    x0, x1 = fx(min(xs)), fx(max(xs))
    if x1 == x0:
        x1 = x0 + 1
    ymax = nice_max(max(ys) * 1.05)

    def px(x):
        return left + (fx(x) - x0) / (x1 - x0) * pw

    def py(y):
        return top + ph - y / ymax * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
           f'<text x="{left + pw / 2}" y="{h - 10}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<text x="16" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {top + ph / 2})">'
           f'{escape(ylabel)}</text>']
    for i in range(6):
        yv = ymax * i / 5
        y = py(yv)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        label = f"{yv:,.0f}" if ymax >= 10 else f"{yv:.1f}"
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    ticks = sorted(set(xs))
    if len(ticks) > 12:  # a time series: ten evenly spaced ticks instead of one per point
        lo, hi = min(xs), max(xs)
        ticks = [lo + (hi - lo) * i / 10 for i in range(11)]
    for x in ticks:
        out.append(f'<text x="{px(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{x:,.0f}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        out.append(f'<rect x="{left + 10}" y="{top + 8 + i * 18}" width="12" height="4" fill="{color}"/>')
        out.append(f'<text x="{left + 28}" y="{top + 14 + i * 18}">{escape(name)}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def draw(results, outdir):
    s = results["scenarios"]
    if "concurrency" in s:
        c = s["concurrency"]
        chart(os.path.join(outdir, "throughput-vs-concurrency.svg"), "Throughput vs concurrency (wrk connections)",
              "connections", "requests/s",
              [(name, [(p["connections"], p["rps"]) for p in pts]) for name, pts in c.items()], logx=True)
        chart(os.path.join(outdir, "p99-vs-concurrency.svg"), "p99 latency vs concurrency",
              "connections", "p99 (ms)",
              [(name, [(p["connections"], p["p99_us"] / 1000) for p in pts]) for name, pts in c.items()], logx=True)
    if "sizes" in s:
        pts = s["sizes"]
        chart(os.path.join(outdir, "throughput-vs-stored.svg"), "Throughput vs stored tokens",
              "stored tokens", "requests/s",
              [(name, [(p["stored"], p[name]["rps"]) for p in pts]) for name in ("tokenize", "detokenize")],
              logx=True)
    if "rewrap" in s and s["rewrap"]["timeline"]:
        tl = s["rewrap"]["timeline"]
        rates, prev = [], (0.0, 0)
        for p in tl:
            dt = p["t"] - prev[0]
            if dt > 0:
                rates.append((p["t"], (p["rewrapped"] - prev[1]) / dt))
            prev = (p["t"], p["rewrapped"])
        chart(os.path.join(outdir, "rewrap-rate.svg"), "Online rewrap rate while serving tokenize",
              "seconds", "records/s", [("rewrap", rates)])
