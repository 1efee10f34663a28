"""`bench/metrics.py` on hand-built runs: exact percentiles (numpy's linear
interpolation), throughputs, SLO attainment and goodput, cost, and the saved JSON."""

from __future__ import annotations

import json
import math

import pytest

from pdserve.bench import metrics
from pdserve.bench.types import SLO, Percentiles, RequestRecord, RunResult


def make_run() -> RunResult:
    """Three successful requests and one error over 2 s.

    TTFT 100/200/400 ms, TPOT 25/100/10 ms, ITL 20,30 | 50 | 10,10,10 ms,
    E2E 150/300/430 ms, prompt tokens 10+20+30, output tokens 3+2+4.
    """
    records = [
        RequestRecord(0.0, 10, 3, ttft_s=0.1, itl_s=[0.02, 0.03], e2e_s=0.15),
        RequestRecord(0.5, 20, 2, ttft_s=0.2, itl_s=[0.05], e2e_s=0.3),
        RequestRecord(1.0, 30, 4, ttft_s=0.4, itl_s=[0.01, 0.01, 0.01], e2e_s=0.43),
        RequestRecord(1.5, e2e_s=0.05, error="HTTP 500: boom", has_usage=False),
    ]
    return RunResult(config={"rate": math.inf, "seed": 3}, records=records, duration_s=2.0)


def values(p: Percentiles) -> tuple[float, float, float, float]:
    return (p.mean, p.p50, p.p90, p.p99)


def test_percentiles_are_numpy_linear_interpolation():
    s = metrics.summarize(make_run())
    # p90 of 3 values sits at rank 0.9 * 2 = 1.8: v[1] + 0.8 * (v[2] - v[1]).
    assert values(s.ttft_ms) == pytest.approx((700 / 3, 200.0, 360.0, 396.0))
    assert values(s.tpot_ms) == pytest.approx((45.0, 25.0, 85.0, 98.5))
    # ITL pools every gap: sorted 10,10,10,20,30,50.
    assert values(s.itl_ms) == pytest.approx((130 / 6, 15.0, 40.0, 49.0))
    assert values(s.e2e_ms) == pytest.approx((880 / 3, 300.0, 404.0, 427.4))


def test_counts_and_throughputs():
    s = metrics.summarize(make_run())
    assert (s.num_requests, s.num_ok, s.num_errors) == (4, 3, 1)
    assert s.duration_s == 2.0
    assert s.request_throughput == 1.5
    assert s.output_throughput == 4.5
    assert s.total_token_throughput == 34.5
    assert s.num_without_usage == 0  # only the error lacks usage, and errors do not count


def test_slo_attainment_counts_errors_as_misses():
    tight = metrics.summarize(make_run(), SLO(ttft_ms=250, tpot_ms=50))
    # met: the first only (the second misses TPOT, the third TTFT, the fourth failed).
    assert tight.slo_attainment == 0.25
    assert tight.goodput == 0.5
    loose = metrics.summarize(make_run(), SLO(ttft_ms=500, tpot_ms=200))
    assert loose.slo_attainment == 0.75
    assert loose.goodput == 1.5
    assert loose.goodput <= loose.request_throughput
    assert metrics.summarize(make_run()).slo_attainment is None


def test_slo_on_a_one_token_request_checks_ttft_only():
    record = RequestRecord(0.0, 5, 1, ttft_s=0.1, e2e_s=0.1)
    s = metrics.summarize(RunResult({}, [record], 1.0), SLO(ttft_ms=100, tpot_ms=1))
    assert s.tpot_ms is None
    assert s.slo_attainment == 1.0


def test_cost_per_million_output_tokens():
    s = metrics.summarize(make_run(), price_per_hour=3.6)
    # 4.5 output tok/s * 3600 s = 16200 tokens per hour for $3.6.
    assert s.cost_per_million_output_tokens == pytest.approx(3.6 / 16200 * 1e6)
    assert metrics.summarize(make_run()).cost_per_million_output_tokens is None


def test_empty_and_all_failed_runs():
    s = metrics.summarize(RunResult({}, [], 0.0), SLO(100, 10), price_per_hour=1.0)
    assert (s.num_requests, s.request_throughput, s.output_throughput) == (0, 0.0, 0.0)
    assert s.ttft_ms is None and s.itl_ms is None
    assert (s.slo_attainment, s.goodput, s.cost_per_million_output_tokens) == (0.0, 0.0, None)
    failed = RunResult({}, [RequestRecord(0.0, e2e_s=0.2, error="HTTP 503: busy")], 0.2)
    s = metrics.summarize(failed, SLO(100, 10))
    assert (s.num_errors, s.slo_attainment, s.goodput, s.e2e_ms) == (1, 0.0, 0.0, None)


def test_missing_usage_is_flagged():
    record = RequestRecord(0.0, ttft_s=0.1, itl_s=[0.01], e2e_s=0.11, has_usage=False)
    s = metrics.summarize(RunResult({}, [record], 1.0))
    assert s.num_without_usage == 1
    assert s.output_throughput == 0.0
    assert "WARNING: 1 requests got no usage" in metrics.format_summary(s)


def test_format_summary_table():
    s = metrics.summarize(make_run(), SLO(ttft_ms=250, tpot_ms=50), price_per_hour=3.6)
    text = metrics.format_summary(s, {"url": "http://x", "rate": 2.0})
    lines = text.splitlines()
    assert lines[:2] == ["url   http://x", "rate  2.0"]
    assert "requests            4 (3 ok, 1 errors) in 2.00 s" in lines
    assert "TTFT          233.33    200.00    360.00    396.00" in lines
    assert "ITL            21.67     15.00     40.00     49.00" in lines
    assert "SLO attainment      25.0% (errors count as misses)" in lines
    assert "goodput             0.500 req/s meeting both" in lines
    assert "cost                $222.2222 per 1M output tokens" in lines


def test_json_round_trip_of_run_and_summary():
    run = make_run()
    summary = metrics.summarize(run, SLO(250, 50), price_per_hour=3.6)
    text = metrics.to_json(run, summary)
    data = json.loads(text)  # strict JSON: the infinite rate is saved as "inf"
    assert data["config"] == {"rate": "inf", "seed": 3}
    back = metrics.from_json(text)
    assert back.records == run.records
    assert back.duration_s == run.duration_s
    assert metrics.summary_from_dict(data["summary"]) == summary
    assert metrics.summarize(back, SLO(250, 50), price_per_hour=3.6) == summary


def test_from_json_rejects_other_files():
    with pytest.raises(ValueError, match="not a saved pdserve bench run"):
        metrics.from_json('{"records": []}')
