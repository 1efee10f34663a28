"""Reports of `pdserve bench`: JSON, one self-contained HTML file, and side-by-side tables.

- `write_json(path, payload)`: any mix of dataclasses (`Summary`, `RunResult`, ...),
  mappings and lists as indented JSON; NaN and infinities become `null` so strict parsers
  read it. Read summaries back with `metrics.summary_from_dict`.
- `write_html(path, runs, goodput_results=None)`: one HTML file with the configuration
  and summary tables, latency CDFs (TTFT, TPOT, E2E), TTFT and TPOT percentile bars, and
  — when given goodput-search probes — SLO attainment and throughput against the offered
  rate; with several runs, a per-configuration comparison (ratios to the first run).
- `write_goodput_html(path, {label: GoodputResult})`: the same for goodput searches —
  the run at each goodput rate, and every probe against the rate.
- `compare(paths)` / `pdserve bench compare A.json B.json ... [--html out.html]`: the same
  metric rows as text, one column per run, each value after the first with its ratio to
  the first run.

Why this way: a report has to open offline, years later, attached to an issue — so it is
one file with plots as inline SVG (`bench/plots.py`), no script, no stylesheet or font
link, no URL to fetch. Every table is built from one list of metric rows (`METRICS`), so
the HTML and the terminal show the same numbers with the same names. The HTML is
rendered from runs and summaries only, never by re-reading files, so sweeps and tests
can build one from values in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdserve.bench import plots
from pdserve.bench.types import RunResult, Summary

if TYPE_CHECKING:
    from pdserve.bench.goodput import GoodputResult

Run = tuple[str, RunResult, Summary]  # (label, the measured run, its summary)
Probe = tuple[float, Summary]  # (offered rate in requests/s, what it measured)
Section = tuple[str, str, str]  # (element id, heading, inner HTML)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    get: Callable[[Summary], float | None]
    kind: str = "float"  # float | int | pct: how the value is printed


def _pct(field: str, stat: str) -> Callable[[Summary], float | None]:
    def get(s: Summary) -> float | None:
        p = getattr(s, field)
        return None if p is None else getattr(p, stat)

    return get


METRICS: list[Metric] = [
    Metric("requests", lambda s: s.num_requests, "int"),
    Metric("errors", lambda s: s.num_errors, "int"),
    Metric("duration (s)", lambda s: s.duration_s),
    Metric("request throughput (req/s)", lambda s: s.request_throughput),
    Metric("output throughput (tok/s)", lambda s: s.output_throughput),
    Metric("total throughput (tok/s)", lambda s: s.total_token_throughput),
    *(
        Metric(f"{name} {stat} (ms)", _pct(field, stat))
        for name, field in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"))
        for stat in ("mean", "p50", "p90", "p99")
    ),
    *(Metric(f"E2E {stat} (ms)", _pct("e2e_ms", stat)) for stat in ("mean", "p50", "p90", "p99")),
    Metric("SLO attainment", lambda s: s.slo_attainment, "pct"),
    Metric("goodput (req/s)", lambda s: s.goodput),
    Metric("cost ($/1M output tokens)", lambda s: s.cost_per_million_output_tokens),
]
# What the comparison chart shows: throughput, goodput and the tails users feel.
CHART_METRICS = [
    "output throughput (tok/s)",
    "goodput (req/s)",
    "TTFT p99 (ms)",
    "TPOT p99 (ms)",
    "E2E p99 (ms)",
]


# ---- JSON -----------------------------------------------------------------------------


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_plain(payload), indent=2) + "\n", encoding="utf-8")
    return path


def to_plain(obj: Any) -> Any:
    """Dataclasses, mappings and sequences as JSON values (dataclass fields only)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


# ---- text tables ----------------------------------------------------------------------


def format_value(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "int":
        return str(int(value))
    if kind == "pct":
        return f"{value * 100:.1f}%"
    return f"{value:.2f}"


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def compare_rows(summaries: Sequence[tuple[str, Summary]]) -> list[list[str]]:
    """Header plus one row per metric: the first run's value, then every other run's
    value with its ratio to the first (`12.50 (0.85x)`; `-` where undefined)."""
    rows = [["metric", *(label for label, _ in summaries)]]
    for m in METRICS:
        base = m.get(summaries[0][1])
        cells = [m.name, format_value(base, m.kind)]
        for _, s in summaries[1:]:
            value = m.get(s)
            r = ratio(value, base)
            cells.append(format_value(value, m.kind) + (f" ({r:.2f}x)" if r is not None else ""))
        rows.append(cells)
    return rows


def format_table(rows: Sequence[Sequence[str]], num_left: int = 1) -> str:
    """Aligned columns: the first `num_left` to the left (names), the rest to the right
    (numbers); a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = [
            c.ljust(w) if i < num_left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def compare_table(summaries: Sequence[tuple[str, Summary]]) -> str:
    return format_table(compare_rows(summaries))


def compare(paths: Sequence[str | os.PathLike]) -> str:
    return compare_table([(label, summary) for label, _, summary in load_runs(paths)])


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Read runs saved by `pdserve bench run --out`, with the summary saved next to the
    records (made under the run's own SLO and price); a file without one is summarised
    again, without an SLO."""
    from pdserve.bench import metrics

    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        result = metrics.run_from_dict(data)
        saved = data.get("summary")
        summary = metrics.summary_from_dict(saved) if saved else metrics.summarize(result)
        runs.append((str(result.config.get("label") or Path(path).stem), result, summary))
    return runs


def add_compare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="run JSON files (`pdserve bench run --out`)")
    parser.add_argument("--html", default=None, help="also write a comparison HTML report")


def cmd_compare(args: argparse.Namespace) -> int:
    runs = load_runs(args.paths)
    print(compare_table([(label, summary) for label, _, summary in runs]))
    if args.html:
        write_html(args.html, runs, title="pdserve bench comparison")
        print(f"wrote {args.html}")
    return 0


# ---- HTML -----------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) { background: #f6f6f6; }
svg { max-width: 100%; height: auto; display: block; margin: 1em 0; }
.meta { color: #666; }
"""


def html_table(rows: Sequence[Sequence[Any]]) -> str:
    """The first row is the header; cells are escaped text."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>\n"
        for row in rows[1:]
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def write_html(
    path: str | os.PathLike,
    runs: Sequence[Run],
    goodput_results: Mapping[str, Sequence[Probe]] | None = None,
    *,
    title: str = "pdserve bench report",
    attainment_target: float | None = None,
    extra_sections: Sequence[Section] = (),
) -> Path:
    """`goodput_results`: label → the probes of its goodput search, (rate, Summary)
    each. `extra_sections` (e.g. a sweep's ranking) come right after the header."""
    sections = [*extra_sections]
    if runs:
        sections += [_config_section(runs), _summary_section(runs)]
        sections += [_latency_section(runs), _percentile_section(runs)]
    if goodput_results:
        sections.append(_goodput_section(goodput_results, attainment_target))
    if len(runs) > 1:
        sections.append(_comparison_section(runs))
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{html.escape(heading)}</h2>\n{inner}\n</section>'
        for sid, heading, inner in sections
    )
    page = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="meta">{html.escape(_machine())}</p>\n'
        f"{body}\n</body>\n</html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def write_goodput_html(
    path: str | os.PathLike,
    results: Mapping[str, GoodputResult],
    *,
    title: str = "pdserve bench goodput",
    extra_sections: Sequence[Section] = (),
) -> Path:
    """The report of goodput searches (label → result): the run at each goodput rate,
    and every probe against the rate."""
    runs = [run for label, result in results.items() for run in goodput_runs(label, result)]
    targets = {r.attainment_target for r in results.values()}
    return write_html(
        path,
        runs,
        {label: result.probes for label, result in results.items()},
        title=title,
        attainment_target=targets.pop() if len(targets) == 1 else None,
        extra_sections=extra_sections,
    )


def goodput_runs(label: str, result: GoodputResult) -> list[Run]:
    """The run at the goodput rate with its summary; none when no probed rate passed."""
    summary = next((p.summary for p in result.probes if p.rate == result.goodput), None)
    if result.best_run is None or summary is None:
        return []
    return [(label, result.best_run, summary)]


def machine_info() -> dict[str, Any]:
    """Where a report was made: benchmarks say what hardware their numbers come from."""
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": sys.platform,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _machine() -> str:
    m = machine_info()
    return (
        f"generated {m['time']} on {m['host']} ({m['cpu_count']} cores, {m['machine']}, "
        f"Python {m['python']}, {m['platform']})"
    )


def _config_section(runs: Sequence[Run]) -> Section:
    keys: dict[str, None] = {}
    for _, result, _ in runs:
        keys.update(dict.fromkeys(result.config))
    rows = [["setting", *(label for label, _, _ in runs)]]
    for key in keys:
        rows.append([key, *(_config_value(result.config.get(key)) for _, result, _ in runs)])
    return "config", "Configuration", html_table(rows)


def _config_value(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(to_plain(value), sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."


def _summary_section(runs: Sequence[Run]) -> Section:
    rows = [["metric", *(label for label, _, _ in runs)]]
    for m in METRICS:
        rows.append([m.name, *(format_value(m.get(s), m.kind) for _, _, s in runs)])
    slos = {label: s.slo for label, _, s in runs if s.slo is not None}
    note = "".join(
        f"<p>SLO of {html.escape(label)}: TTFT ≤ {slo.ttft_ms:g} ms, TPOT ≤ {slo.tpot_ms:g} ms</p>"
        for label, slo in slos.items()
    )
    return "summary", "Summary", html_table(rows) + note


def _latency_section(runs: Sequence[Run]) -> Section:
    def values(result: RunResult, get: Callable[[Any], float | None]) -> list[float]:
        got = (get(r) for r in result.records if r.is_ok)
        return [v * 1e3 for v in got if v is not None]

    figures = [
        ("plot-ttft-cdf", "TTFT CDF", "time to first token (ms)", lambda r: r.ttft_s),
        ("plot-tpot-cdf", "TPOT CDF", "time per output token (ms)", lambda r: r.tpot_s),
        ("plot-e2e-cdf", "E2E latency CDF", "end-to-end latency (ms)", lambda r: r.e2e_s),
    ]
    svgs = [
        plots.cdf_plot(pid, title, xlabel, {label: values(res, get) for label, res, _ in runs})
        for pid, title, xlabel, get in figures
    ]
    return "latency", "Latency distributions", "\n".join(svgs)


def _percentile_section(runs: Sequence[Run]) -> Section:
    svgs = [
        plots.percentile_bars(pid, title, "ms", {label: getattr(s, field) for label, _, s in runs})
        for pid, title, field in (
            ("plot-ttft-percentiles", "TTFT percentiles", "ttft_ms"),
            ("plot-tpot-percentiles", "TPOT percentiles", "tpot_ms"),
        )
    ]
    return "percentiles", "Latency percentiles", "\n".join(svgs)


def _goodput_section(
    results: Mapping[str, Sequence[Probe]], attainment_target: float | None
) -> Section:
    rows = [["search", "rate (req/s)", "attainment", "throughput (req/s)", "goodput (req/s)"]]
    for label, probes in results.items():
        for rate, s in sorted(probes, key=lambda p: p[0]):
            rows.append(
                [
                    label,
                    format_value(rate, "float"),
                    format_value(s.slo_attainment, "pct"),
                    format_value(s.request_throughput, "float"),
                    format_value(s.goodput, "float"),
                ]
            )
    attainment = plots.rate_plot(
        "plot-attainment-vs-rate",
        "SLO attainment vs rate",
        "fraction of requests meeting the SLOs",
        {label: _points(probes, lambda s: s.slo_attainment) for label, probes in results.items()},
        hline=attainment_target,
        hline_label="target" if attainment_target is not None else "",
    )
    throughput = plots.rate_plot(
        "plot-throughput-vs-rate",
        "Throughput vs rate",
        "requests/s (solid: completed, dashed: goodput)",
        {
            label: _points(probes, lambda s: s.request_throughput)
            for label, probes in results.items()
        },
        dashed={label: _points(probes, lambda s: s.goodput) for label, probes in results.items()},
        dashed_suffix="goodput",
    )
    return "goodput", "Goodput search", "\n".join([html_table(rows), attainment, throughput])


def _points(probes: Sequence[Probe], get: Callable[[Summary], float | None]) -> list:
    return [(rate, y) for rate, s in probes if (y := get(s)) is not None]


def _comparison_section(runs: Sequence[Run]) -> Section:
    summaries = [(label, s) for label, _, s in runs]
    table = html_table(compare_rows(summaries))
    by_name = {m.name: m for m in METRICS}
    base = runs[0][2]
    series = {}
    for label, s in summaries[1:]:
        got = (ratio(by_name[n].get(s), by_name[n].get(base)) for n in CHART_METRICS)
        series[label] = [r if r is not None else 0.0 for r in got]
    chart = plots.ratio_bars("plot-comparison", f"Ratios to {runs[0][0]}", CHART_METRICS, series)
    return "comparison", "Per-configuration comparison", table + "\n" + chart
