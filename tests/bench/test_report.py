"""Reports: JSON round trips, the self-contained HTML report, and the compare table."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest

from pdserve.bench import metrics
from pdserve.bench.report import (
    cmd_compare,
    compare,
    compare_table,
    goodput_runs,
    write_goodput_html,
    write_html,
    write_json,
)
from pdserve.bench.types import RequestRecord, RunResult
from tests.bench.report_builders import (
    RUN_PLOT_TITLES,
    Page,
    make_run,
    make_summary,
    two_goodput_searches,
    two_runs,
    two_runs_probes,
)


@pytest.fixture(scope="module", name="two_runs")
def two_runs_fixture():
    return two_runs()


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, two_runs) -> tuple[str, Page]:
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_html(path, two_runs, two_runs_probes(), attainment_target=0.9)
    text = path.read_text(encoding="utf-8")
    return text, Page(text)


# ---- JSON -----------------------------------------------------------------------------


def test_summary_json_round_trip(tmp_path):
    summary = make_summary(cost_per_million_output_tokens=1.25)
    path = write_json(tmp_path / "out" / "s.json", {"summary": summary, "nan": math.nan})
    data = json.loads(path.read_text())
    assert data["nan"] is None  # strict JSON: no NaN literal
    assert metrics.summary_from_dict(data["summary"]) == summary


def test_run_json_round_trip(tmp_path):
    run = make_run("a")
    data = json.loads(write_json(tmp_path / "r.json", run).read_text())
    records = [RequestRecord(**r) for r in data["records"]]
    assert RunResult(data["config"], records, data["duration_s"]) == run


# ---- HTML -----------------------------------------------------------------------------


def test_html_is_self_contained(full_report):
    text, page = full_report
    assert not {"script", "link", "img", "iframe", "object"} & set(page.tags)
    assert all(u.startswith("#") for u in page.urls), page.urls  # only in-page references
    # The only URL text is the runs' own server address, shown in the config table.
    assert re.findall(r"https?://[^\s\"<]*", text) == ["http://127.0.0.1:8000"] * 2
    assert "@import" not in text and "url(http" not in text
    assert len(page.ids) == len(set(page.ids)), "element ids clash between plots"


def test_html_has_every_section_and_plot(full_report):
    text, page = full_report
    assert page.sections == ["config", "summary", "latency", "percentiles", "goodput", "comparison"]
    assert text.count("<svg") == 8
    assert page.svg_titles == [*RUN_PLOT_TITLES, "Ratios to agg"]


def test_html_tables_hold_the_numbers(full_report):
    _, page = full_report
    config, summary, probes, comparison = range(4)
    assert page.tables[config][0] == ["setting", "agg", "disagg"]
    assert page.row(config, "rate") == ["rate", "4.0", "4.0"]
    assert page.row(summary, "TTFT p99 (ms)") == ["TTFT p99 (ms)", "300.00", "600.00"]
    assert page.row(summary, "output throughput (tok/s)")[1:] == ["640.00", "320.00"]
    assert page.row(summary, "SLO attainment")[1:] == ["95.0%", "50.0%"]
    assert page.row(summary, "goodput (req/s)")[1:] == ["4.75", "2.38"]
    assert page.row(summary, "cost ($/1M output tokens)")[1:] == ["-", "-"]
    # Probes sorted by rate within each search.
    assert [r[:3] for r in page.tables[probes][1:]] == [
        ["agg", "1.00", "95.0%"],
        ["agg", "2.00", "50.0%"],
        ["disagg", "1.00", "95.0%"],
        ["disagg", "3.00", "50.0%"],
    ]
    assert page.row(comparison, "TTFT p99 (ms)") == ["TTFT p99 (ms)", "300.00", "600.00 (2.00x)"]


def test_html_of_one_run_has_no_comparison(tmp_path, two_runs):
    path = write_html(tmp_path / "one.html", two_runs[:1])
    page = Page(path.read_text())
    assert page.sections == ["config", "summary", "latency", "percentiles"]
    assert len(page.svg_titles) == 5


# ---- compare --------------------------------------------------------------------------

EXPECTED_COMPARE = """\
metric                          agg           disagg
--------------------------  -------  ---------------
requests                        100      100 (1.00x)
errors                            2        2 (1.00x)
duration (s)                  20.00    20.00 (1.00x)
request throughput (req/s)     5.00     2.50 (0.50x)
output throughput (tok/s)    640.00   320.00 (0.50x)
total throughput (tok/s)    1920.00   960.00 (0.50x)
TTFT mean (ms)               100.00   200.00 (2.00x)
TTFT p50 (ms)                 90.00   180.00 (2.00x)
TTFT p90 (ms)                150.00   300.00 (2.00x)
TTFT p99 (ms)                300.00   600.00 (2.00x)
TPOT mean (ms)                20.00    40.00 (2.00x)
TPOT p50 (ms)                 19.00    38.00 (2.00x)
TPOT p90 (ms)                 25.00    50.00 (2.00x)
TPOT p99 (ms)                 40.00    80.00 (2.00x)
ITL mean (ms)                 20.00    40.00 (2.00x)
ITL p50 (ms)                  18.00    36.00 (2.00x)
ITL p90 (ms)                  26.00    52.00 (2.00x)
ITL p99 (ms)                  45.00    90.00 (2.00x)
E2E mean (ms)               2640.00  5280.00 (2.00x)
E2E p50 (ms)                2500.00  5000.00 (2.00x)
E2E p90 (ms)                3000.00  6000.00 (2.00x)
E2E p99 (ms)                4000.00  8000.00 (2.00x)
SLO attainment                95.0%    50.0% (0.53x)
goodput (req/s)                4.75     2.38 (0.50x)
cost ($/1M output tokens)         -                -"""


def test_compare_table_is_exact(two_runs):
    assert compare_table([(label, s) for label, _, s in two_runs]) == EXPECTED_COMPARE


def test_compare_ratio_is_undefined_without_a_base():
    base = make_summary(goodput=0.0, ttft_ms=None, cost_per_million_output_tokens=2.0)
    other = make_summary(goodput=1.0, cost_per_million_output_tokens=3.0)
    table = compare_table([("a", base), ("b", other), ("c", make_summary())])
    rows = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert rows["goodput (req/s)"][-3:] == ["0.00", "1.00", "4.75"]  # no ratio to zero
    assert rows["TTFT p99 (ms)"][-3:] == ["-", "300.00", "300.00"]
    assert rows["cost ($/1M output tokens)"][-4:] == ["2.00", "3.00", "(1.50x)", "-"]


def _save(path: Path, label: str, ttft_ms: float) -> Path:
    run = make_run(label, ttft_ms=ttft_ms)
    path.write_text(metrics.to_json(run, metrics.summarize(run, make_summary().slo)))
    return path


def test_cmd_compare_prints_the_table_and_writes_html(tmp_path, capsys):
    paths = [_save(tmp_path / "a.json", "first", 50.0), _save(tmp_path / "b.json", "second", 75.0)]
    html_path = tmp_path / "cmp.html"
    assert cmd_compare(argparse.Namespace(paths=[str(p) for p in paths], html=str(html_path))) == 0
    out = capsys.readouterr().out
    assert out.startswith(compare(paths) + "\n")
    assert out.splitlines()[0].split() == ["metric", "first", "second"]
    # The saved summary (with its SLO) is used: 20 of 21 requests meet it, 1 failed.
    attainment = next(line for line in out.splitlines() if line.startswith("SLO attainment"))
    assert attainment.split()[2:] == ["95.2%", "95.2%", "(1.00x)"]
    page = Page(html_path.read_text())
    assert page.sections[-1] == "comparison"
    assert page.svg_titles[-1] == "Ratios to first"


def test_goodput_html_shows_the_run_at_each_goodput_rate(tmp_path):
    searches = two_goodput_searches()
    passed, failed = searches["a"], searches["b"]
    assert (passed.goodput, failed.goodput, failed.best_run) == (2.0, 0.0, None)
    assert goodput_runs("b", failed) == []
    path = write_goodput_html(tmp_path / "g.html", searches)
    page = Page(path.read_text())
    assert page.sections == ["config", "summary", "latency", "percentiles", "goodput"]
    assert page.tables[1][0] == ["metric", "a"]  # only the search that found a rate
    assert page.row(1, "SLO attainment") == ["SLO attainment", "95.2%"]
    assert [r[:2] for r in page.tables[2][1:]] == [
        ["a", "1.00"],
        ["a", "2.00"],
        ["a", "4.00"],
        ["b", "0.50"],
        ["b", "1.00"],
    ]
