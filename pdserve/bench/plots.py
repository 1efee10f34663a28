"""The plots of `pdserve bench` reports, each returned as an inline `<svg>` string.

Contract: every function takes plain data (label → values) and returns one `<svg>`
element ready to paste into HTML: no XML prolog or DOCTYPE, no metadata block, no
namespace or any other URL, a `<title>` child naming the plot, and only the element ids
its own references use — salted with the plot id, so several plots share one page
without id clashes and a report is byte-for-byte reproducible.

Why this way: a report must be one self-contained file that opens offline and can be
attached to an issue, so plots are vector SVG rather than linked images or a JS library
from a CDN. Text stays text (`svg.fonttype: none`) so the numbers on axes are searchable.
Figures are built with `matplotlib.figure.Figure`, never `pyplot`: no global backend
state, no GUI, safe to call from any thread (rendering goes through the Agg-family
non-interactive canvases). Torch-free, like everything in `bench/`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping, Sequence

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pdserve.bench.types import Percentiles

MAX_CDF_POINTS = 400  # per line: enough for a smooth curve, keeps big runs' SVGs small
FIGSIZE = (6.4, 3.6)

Points = Sequence[tuple[float, float]]


def cdf_plot(plot_id: str, title: str, xlabel: str, series: Mapping[str, Sequence[float]]) -> str:
    """Empirical CDF per label (a step line from the smallest to the largest value)."""

    def draw(ax: Axes) -> None:
        for label, values in series.items():
            xs, ys = _cdf_points(values)
            ax.step(xs, ys, where="post", label=f"{label} (n={len(values)})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)

    return _render(plot_id, title, draw)


def percentile_bars(
    plot_id: str, title: str, ylabel: str, series: Mapping[str, Percentiles | None]
) -> str:
    """Grouped bars: mean, p50, p90, p99 on the x axis, one bar per label in each group."""
    stats = ("mean", "p50", "p90", "p99")

    def draw(ax: Axes) -> None:
        width = 0.8 / max(1, len(series))
        for i, (label, p) in enumerate(series.items()):
            heights = [getattr(p, s) if p is not None else 0.0 for s in stats]
            ax.bar([g + i * width for g in range(len(stats))], heights, width, label=label)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(stats))], stats)
        ax.set_ylabel(ylabel)

    return _render(plot_id, title, draw)


def rate_plot(
    plot_id: str,
    title: str,
    ylabel: str,
    series: Mapping[str, Points],
    hline: float | None = None,
    hline_label: str = "",
    dashed: Mapping[str, Points] | None = None,
    dashed_suffix: str = "",
) -> str:
    """y against the offered request rate, one marked line per label; `dashed`: a second
    line per label in the same colour (e.g. goodput next to throughput); an optional
    horizontal reference line (the attainment target)."""

    def draw(ax: Axes) -> None:
        for label, points in series.items():
            (line,) = ax.plot(*_xy(points), marker="o", label=label)
            if dashed and label in dashed:
                color = line.get_color()
                name = f"{label} {dashed_suffix}".strip()
                ax.plot(*_xy(dashed[label]), marker="x", ls="--", color=color, label=name)
        if hline is not None:
            ax.axhline(hline, color="grey", linestyle="--", label=hline_label)
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(ylabel)

    return _render(plot_id, title, draw)


def ratio_bars(
    plot_id: str, title: str, metrics: Sequence[str], series: Mapping[str, Sequence[float]]
) -> str:
    """Horizontal grouped bars of ratios to a baseline (1.0 marked), one group per metric."""

    def draw(ax: Axes) -> None:
        height = 0.8 / max(1, len(series))
        for i, (label, ratios) in enumerate(series.items()):
            ax.barh([g + i * height for g in range(len(metrics))], ratios, height, label=label)
        ax.set_yticks([g + 0.4 - height / 2 for g in range(len(metrics))], metrics)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", linestyle="--")
        ax.set_xlabel("ratio to the first run")

    return _render(plot_id, title, draw, figsize=(6.4, 0.5 + 0.45 * len(metrics)))


def _xy(points: Points) -> tuple[list[float], list[float]]:
    ordered = sorted(points)
    return [x for x, _ in ordered], [y for _, y in ordered]


def _cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return [], []
    step = max(1, n // MAX_CDF_POINTS)
    idx = [*range(0, n, step)]
    if idx[-1] != n - 1:
        idx.append(n - 1)  # the maximum is always drawn
    return [ordered[i] for i in idx], [(i + 1) / n for i in idx]


def _render(
    plot_id: str,
    title: str,
    draw: Callable[[Axes], None],
    figsize: tuple[float, float] = FIGSIZE,
) -> str:
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    draw(ax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": plot_id}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return _inline_svg(buf.getvalue(), plot_id, title)


def _inline_svg(svg: str, plot_id: str, title: str) -> str:
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and the DOCTYPE (a URL)
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    # HTML5 puts inline <svg> in the SVG namespace by itself; the attributes are URLs.
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    used = set(re.findall(r"#([\w.-]+)", svg))
    svg = re.sub(r'\s+id="([^"]*)"', lambda m: m.group(0) if m.group(1) in used else "", svg)
    head_end = svg.index(">") + 1
    head = svg[:head_end].replace("<svg", f'<svg id="{plot_id}" role="img"', 1)
    return f"{head}\n <title>{_escape(title)}</title>{svg[head_end:]}"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
