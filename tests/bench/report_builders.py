"""Builders for the report and sweep tests: hand-made runs and summaries with exact
numbers (no server), and `Page`, an HTML report parsed into what the tests check."""

from __future__ import annotations

from html.parser import HTMLParser

from pdserve.bench.goodput import GoodputResult, Probe, search_goodput
from pdserve.bench.types import SLO, Percentiles, RequestRecord, RunResult, Summary

# The plots of a report of runs and goodput probes, in page order (a report comparing
# several runs adds "Ratios to <first run>").
RUN_PLOT_TITLES = [
    "TTFT CDF",
    "TPOT CDF",
    "E2E latency CDF",
    "TTFT percentiles",
    "TPOT percentiles",
    "SLO attainment vs rate",
    "Throughput vs rate",
]


def make_record(
    i: int, ttft_ms: float, tpot_ms: float, num_output_tokens: int = 5
) -> RequestRecord:
    ttft, tpot = ttft_ms / 1e3, tpot_ms / 1e3
    return RequestRecord(
        start_s=0.1 * i,
        num_prompt_tokens=10,
        num_output_tokens=num_output_tokens,
        ttft_s=ttft,
        itl_s=[tpot] * (num_output_tokens - 1),
        e2e_s=ttft + tpot * (num_output_tokens - 1),
    )


def make_run(label: str, ttft_ms: float = 50.0, tpot_ms: float = 20.0, n: int = 20) -> RunResult:
    """`n` requests whose TTFT and TPOT grow linearly from the given values; one error."""
    records = [make_record(i, ttft_ms + i, tpot_ms + 0.5 * i) for i in range(n)]
    records.append(RequestRecord(start_s=0.1 * n, error="HTTP 503: no worker"))
    config = {"label": label, "url": "http://127.0.0.1:8000", "workload": "chat", "rate": 4.0}
    return RunResult(config=config, records=records, duration_s=10.0)


def two_runs() -> list[tuple[str, RunResult, Summary]]:
    """`agg`, then `disagg` with a slower TTFT and a faster TPOT."""
    return [
        ("agg", make_run("agg"), make_summary()),
        ("disagg", make_run("disagg", ttft_ms=80.0, tpot_ms=15.0), make_summary(2.0)),
    ]


def two_runs_probes() -> dict[str, list[Probe]]:
    """Goodput probes of the two runs, unsorted by rate."""
    return {
        "agg": [Probe(2.0, make_summary(2.0)), Probe(1.0, make_summary())],
        "disagg": [Probe(1.0, make_summary()), Probe(3.0, make_summary(2.0))],
    }


def two_goodput_searches() -> dict[str, GoodputResult]:
    """`a` finds 2 req/s in 3 probes; `b` fails at every rate it tries (2 probes)."""
    slo = make_summary().slo
    passed = search_goodput(lambda rate: make_run("a", ttft_ms=60.0 * rate), slo, max_probes=3)
    failed = search_goodput(lambda rate: make_run("b", ttft_ms=500.0), slo, max_probes=2)
    return {"a": passed, "b": failed}


def make_summary(scale: float = 1.0, **changes) -> Summary:
    """Round numbers; latencies multiplied by `scale`, throughputs divided by it."""
    fields = dict(
        num_requests=100,
        num_ok=98,
        num_errors=2,
        duration_s=20.0,
        request_throughput=5.0 / scale,
        output_throughput=640.0 / scale,
        total_token_throughput=1920.0 / scale,
        ttft_ms=Percentiles(
            mean=100.0 * scale, p50=90.0 * scale, p90=150.0 * scale, p99=300.0 * scale
        ),
        tpot_ms=Percentiles(
            mean=20.0 * scale, p50=19.0 * scale, p90=25.0 * scale, p99=40.0 * scale
        ),
        itl_ms=Percentiles(mean=20.0 * scale, p50=18.0 * scale, p90=26.0 * scale, p99=45.0 * scale),
        e2e_ms=Percentiles(
            mean=2640.0 * scale, p50=2500.0 * scale, p90=3000.0 * scale, p99=4000.0 * scale
        ),
        slo=SLO(ttft_ms=200.0, tpot_ms=30.0),
        slo_attainment=0.95 if scale <= 1 else 0.5,
        goodput=4.75 / scale,
        cost_per_million_output_tokens=None,
    )
    fields.update(changes)
    return Summary(**fields)


VOID = {"meta", "br", "hr", "img", "input", "link", "source", "wbr"}


class Page(HTMLParser):
    """What the tests look at: sections, svg titles, tables, URLs; and that every
    element is closed in order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.ids: list[str] = []
        self.urls: list[str] = []  # src / href values
        self.sections: list[str] = []
        self.svg_titles: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._text: list[str] | None = None
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed elements: {self.stack}"

    def handle_starttag(self, tag, attrs):
        self._start(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self._start(tag, attrs)

    def _start(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "xlink:href")]
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th") or (tag == "title" and "svg" in self.stack):
            self._text = []

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if self._text is None:
            return
        text = "".join(self._text)
        if tag == "title":
            self.svg_titles.append(text)
        elif tag in ("td", "th"):
            self.tables[-1][-1].append(text)
        self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def row(self, table: int, first_cell: str) -> list[str]:
        return next(r for r in self.tables[table] if r and r[0] == first_cell)
