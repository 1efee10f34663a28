"""The goodput search on a stub runner with a known threshold: every rate probed, in
order, the answer, per-core figures and the saved form — no server, no clock."""

from __future__ import annotations

import json

import pytest

from pdserve.bench import goodput
from pdserve.bench.types import SLO, RequestRecord, RequestSpec, RunResult
from pdserve.errors import ConfigError

SLO_ = SLO(ttft_ms=100, tpot_ms=10)


def stub_runner(threshold: float, num_requests: int = 8):
    """Runs whose requests all meet `SLO_` up to `threshold` req/s; above it, a quarter
    miss the TTFT target and a quarter fail (both count as misses): attainment 0.5."""
    rates: list[float] = []

    def run_at_rate(rate: float) -> RunResult:
        rates.append(rate)
        records = []
        for i in range(num_requests):
            if rate > threshold and i % 4 == 0:
                records.append(RequestRecord(i / rate, e2e_s=0.01, error="HTTP 503: busy"))
            elif rate > threshold and i % 4 == 1:
                records.append(RequestRecord(i / rate, 5, 3, 0.5, [0.005, 0.005], 0.51))
            else:
                records.append(RequestRecord(i / rate, 5, 3, 0.05, [0.005, 0.005], 0.06))
        return RunResult({"rate": rate}, records, duration_s=num_requests / rate)

    return run_at_rate, rates


def test_doubles_then_bisects_to_the_threshold():
    run, rates = stub_runner(threshold=7.3)
    result = goodput.search_goodput(run, SLO_, start_rate=1.0, rel_tol=0.05, num_cores=4)
    # 1, 2, 4 pass; 8 fails; bisect [4, 8]: 6 pass, 7 pass, 7.5 fail, 7.25 pass; 7.5/7.25 < 1.05.
    assert rates == [1.0, 2.0, 4.0, 8.0, 6.0, 7.0, 7.5, 7.25]
    assert [p.rate for p in result.probes] == rates
    assert result.goodput == 7.25
    assert result.goodput_per_core == 7.25 / 4
    assert result.best_run is not None and result.best_run.config == {"rate": 7.25}
    attained = [p.summary.slo_attainment for p in result.probes]
    assert attained == [1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 1.0]
    assert [result.is_passing(p) for p in result.probes] == [a == 1.0 for a in attained]


def test_converges_within_the_tolerance():
    run, _ = stub_runner(threshold=7.3)
    result = goodput.search_goodput(run, SLO_, rel_tol=1e-3, max_probes=30)
    assert 7.3 / (1 + 1e-3) <= result.goodput <= 7.3
    assert len(result.probes) < 30


def test_halves_from_a_start_rate_that_fails():
    run, rates = stub_runner(threshold=7.3)
    result = goodput.search_goodput(run, SLO_, start_rate=100.0, max_probes=7)
    assert rates == [100.0, 50.0, 25.0, 12.5, 6.25, 9.375, 7.8125]
    assert result.goodput == 6.25  # the bound on probes stops it; the answer passed


def test_no_rate_passes():
    run, rates = stub_runner(threshold=0.0)
    result = goodput.search_goodput(run, SLO_, start_rate=1.0, min_rate=0.1)
    assert rates == [1.0, 0.5, 0.25, 0.125]
    assert (result.goodput, result.goodput_per_core, result.best_run) == (0.0, 0.0, None)


def test_attainment_target_is_configurable():
    # Above the threshold half the requests miss: a 50% target passes every rate probed.
    run, rates = stub_runner(threshold=7.3)
    result = goodput.search_goodput(run, SLO_, attainment=0.5, max_probes=5)
    assert rates == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert result.goodput == 16.0


def test_on_probe_sees_each_verdict():
    run, _ = stub_runner(threshold=3.0)
    seen = []
    goodput.search_goodput(
        run, SLO_, max_probes=3, on_probe=lambda p, ok: seen.append((p.rate, ok))
    )
    assert seen == [(1.0, True), (2.0, True), (4.0, False)]


def test_bad_settings_are_refused():
    run, rates = stub_runner(threshold=1.0)
    for bad in ({"attainment": 0.0}, {"start_rate": -1.0}, {"max_probes": 0}, {"rel_tol": 0}):
        with pytest.raises(ConfigError):
            goodput.search_goodput(run, SLO_, **bad)
    assert rates == []


def test_saved_result_round_trips_and_prints():
    run, _ = stub_runner(threshold=7.3)
    result = goodput.search_goodput(run, SLO_, num_cores=2)
    data = json.loads(json.dumps(goodput.goodput_to_dict(result), allow_nan=False))
    assert data["goodput_per_core"] == 3.625
    assert goodput.goodput_from_dict(data) == result
    text = goodput.format_goodput(result)
    assert "goodput: 7.250 req/s per machine, 3.625 req/s per core (2 cores)" in text
    assert "   8.000    50.0%    6.000    4.000  " in text  # rate, attainment, req/s, goodput


def test_min_duration_holds_fast_rates_long_enough(monkeypatch):
    """With `min_duration_s`, a probe at rate r sends at least r x min_duration_s requests
    (never fewer than `num_requests`), so a fast rate is not judged on a short burst."""
    from pdserve.bench import loadgen

    sent: list[tuple[float, int]] = []
    runner, _ = stub_runner(threshold=100.0)

    def fake_run(url, model, specs, arrival, *, num_requests, **kwargs) -> RunResult:
        sent.append((arrival.rate, num_requests))
        return runner(arrival.rate)

    monkeypatch.setattr(loadgen, "run_benchmark_sync", fake_run)
    specs = [RequestSpec(prompt="p", max_tokens=3)]
    result = goodput.find_goodput(
        "http://x", "m", specs, SLO_, num_requests=10, min_duration_s=5.0,
        start_rate=1.0, max_probes=3, progress=False,
    )  # fmt: skip
    assert sent == [(1.0, 10), (2.0, 10), (4.0, 20)]
    assert result.goodput == 4.0 and result.is_lower_bound


def test_each_probe_sends_requests_no_earlier_probe_sent(monkeypatch):
    """A prompt sent again would be served from the prefix cache: probes walk the specs."""
    from pdserve.bench import loadgen

    firsts: list[list[str]] = []

    def fake_run(url, model, specs, arrival, *, num_requests, **kwargs) -> RunResult:
        firsts.append([s.prompt for s in specs[:num_requests]])
        records = [RequestRecord(i, 5, 3, 0.05, [0.005, 0.005], 0.06) for i in range(num_requests)]
        return RunResult({"rate": arrival.rate}, records, duration_s=1.0)

    monkeypatch.setattr(loadgen, "run_benchmark_sync", fake_run)
    count = goodput.specs_for_search(4, 0.0, start_rate=1.0, max_probes=3)
    assert count == 12
    specs = [RequestSpec(prompt=f"p{i}", max_tokens=3) for i in range(count)]
    goodput.find_goodput(
        "http://x", "m", specs, SLO_, num_requests=4, start_rate=1.0, max_probes=3,
        progress=False,
    )  # fmt: skip
    sent = [p for probe in firsts for p in probe]
    assert len(firsts) == 3 and sorted(sent) == sorted(s.prompt for s in specs)  # none twice
    assert firsts[1][0] == "p4" and firsts[2][0] == "p8"
