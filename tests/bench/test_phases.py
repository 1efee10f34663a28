"""Phase-shifting load: the phases file is validated naming the field; each phase's
requests are exactly its workload's, at its own seeded times within its window; a run
against a fake server sends them in order with each phase's extra body; the report
splits attainment and goodput per phase with each phase's own SLO."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.loadgen import Arrival, arrival_times
from pdserve.bench.phases import (
    SEED_STRIDE,
    Phase,
    build_load,
    format_phases,
    load_phases,
    parse_file,
    phases_config,
    summarize_phases,
)
from pdserve.bench.types import SLO, RequestRecord, RunResult
from pdserve.bench.workloads import get_workload
from pdserve.errors import ConfigError
from tests.bench.test_loadgen import run_against, streamer

THREE = {
    "phases": [
        {"workload": "code", "duration_s": 2, "rate": 20},
        {
            "name": "long",
            "workload": "random:in=64,out=8",
            "duration_s": 1.5,
            "rate": 10,
            "slo": {"ttft_ms": 5000, "tpot_ms": 50},
            "extra_body": {"slo_class": "long"},
        },
        {"workload": "chat", "duration_s": 1, "rate": 30, "burstiness": 0.5},
    ],
    "seed": 3,
}


def phase(**changes) -> dict:
    return {**THREE, "phases": [{**THREE["phases"][0], **changes}]}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (phase(duration_s=0), "phases[0].duration_s"),
        (phase(duration_s=-5), "phases[0].duration_s"),
        (phase(duration_s="2m"), "phases[0].duration_s"),
        (phase(duration_s=float("inf")), "phases[0].duration_s"),
        (phase(rate=0), "phases[0].rate"),
        (phase(rate=float("nan")), "phases[0].rate"),
        (phase(rate=True), "phases[0].rate"),
        (phase(burstiness=0), "phases[0].burstiness"),
        (phase(workload="poetry"), "phases[0].workload"),
        (phase(workload=3), "phases[0].workload"),
        (phase(slo={"ttft_ms": 100}), "phases[0].slo.tpot_ms"),
        (phase(slo={"ttft_ms": 100, "tpot_ms": 0}), "phases[0].slo.tpot_ms"),
        (phase(slo={"ttft_ms": 1, "tpot_ms": 1, "e2e_ms": 1}), "phases[0].slo.e2e_ms"),
        (phase(extra_body=[1]), "phases[0].extra_body"),
        (phase(colour="red"), "phases[0].colour"),
        ({"phases": [{"workload": "code", "rate": 1}]}, "phases[0].duration_s"),
        ({"phases": [{"duration_s": 1, "rate": 1}]}, "phases[0].workload"),
        ({"phases": []}, "phases"),
        ({"phases": {"workload": "code"}}, "phases"),
        ({"phases": THREE["phases"], "seed": "x"}, "seed"),
        ({"phase": THREE["phases"]}, "phase"),
    ],
)
def test_a_bad_phases_file_names_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        parse_file(data)
    assert info.value.field == field


def test_a_phases_file_parses(tmp_path):
    path = tmp_path / "phases.yaml"
    path.write_text(json.dumps(THREE))  # JSON is YAML
    phases, seed = load_phases(path)
    assert seed == 3
    assert [(p.label, p.workload, p.duration_s, p.rate) for p in phases] == [
        ("code", "code", 2.0, 20.0),
        ("long", "random:in=64,out=8", 1.5, 10.0),
        ("chat", "chat", 1.0, 30.0),
    ]
    assert phases[1].slo == SLO(5000, 50) and phases[0].slo is None
    assert phases[2].burstiness == 0.5 and dict(phases[1].extra_body) == {"slo_class": "long"}
    with pytest.raises(ConfigError, match="does not exist"):
        load_phases(tmp_path / "missing.yaml")


def test_each_phase_sends_its_workload_at_its_own_times():
    phases, seed = parse_file(THREE)
    load = build_load(phases, seed)
    starts = (0.0, 2.0, 3.5)
    assert load.starts == starts
    offset = 0
    for i, (p, start) in enumerate(zip(phases, starts, strict=True)):
        arrival = Arrival.gamma(p.rate, p.burstiness)
        expected_times = []
        for t in arrival_times(arrival, seed * SEED_STRIDE + i):
            if t >= p.duration_s:
                break
            expected_times.append(start + t)
        specs = load.specs[offset : offset + load.counts[i]]
        offset += load.counts[i]
        assert load.counts[i] == len(expected_times) > 0
        assert [s.timestamp_s for s in specs] == expected_times
        assert all(start <= s.timestamp_s < start + p.duration_s for s in specs)
        expected = get_workload(p.workload).sample(len(specs), seed * SEED_STRIDE + i)
        assert [(s.prompt, s.max_tokens) for s in specs] == [
            (e.prompt, e.max_tokens) for e in expected
        ]
        assert all(s.extra_body == (dict(p.extra_body) or None) for s in specs)
    assert offset == len(load.specs)
    assert load.slos == (get_workload("code").default_slo, SLO(5000, 50), SLO(1500, 100))


def test_phases_of_one_workload_share_no_prompt():
    phases = (Phase("code", 1.0, 30.0), Phase("code", 1.0, 30.0))
    load = build_load(phases, 0)
    first, second = load.specs[: load.counts[0]], load.specs[load.counts[0] :]
    assert not {s.prompt for s in first} & {s.prompt for s in second}


def test_phases_must_send_one_kind_of_request():
    with pytest.raises(ConfigError, match="one kind"):
        build_load((Phase("code", 1.0, 20.0), Phase("multiturn", 1.0, 20.0)), 0)


def test_a_phased_run_sends_each_phase_in_order_with_its_extra_body():
    bodies = []

    async def handle(request):
        bodies.append(await request.json())
        return await streamer(["a", "b"], usage={"prompt_tokens": 5, "completion_tokens": 2})(
            request
        )

    data = {
        "phases": [
            {"workload": "random:in=8,out=2", "duration_s": 0.3, "rate": 40},
            {
                "workload": "random:in=16,out=2",
                "duration_s": 0.3,
                "rate": 40,
                "extra_body": {"slo_class": "long"},
            },
        ]
    }
    phases, _ = parse_file(data)
    load = build_load(phases, 1)
    config = {"phases": phases_config(load)}
    result = run_against(handle, load.specs, Arrival.trace(), config=config)
    assert len(bodies) == len(load.specs) == sum(load.counts)
    by_prompt = {b["prompt"]: b for b in bodies}
    for i, spec in enumerate(load.specs):
        body = by_prompt[spec.prompt]
        is_second = i >= load.counts[0]
        assert body.get("slo_class") == ("long" if is_second else None)
    # Each request leaves at its time, never before it; how late depends on the host's load
    # (a shared CI host ran 67 ms behind), so lateness is not asserted.
    starts = [r.start_s for r in result.records]
    assert all(
        start >= spec.timestamp_s - 1e-3 for start, spec in zip(starts, load.specs, strict=True)
    )
    assert min(starts[load.counts[0] :]) >= 0.3 - 1e-3  # the second phase after the first
    parts = summarize_phases(result)
    assert [p.num_requests for p in parts] == [*load.counts, len(load.specs)]
    assert [p.num_errors for p in parts] == [0, 0, 0]


def record(ttft_s: float, tpot_s: float, error: str | None = None) -> RequestRecord:
    return RequestRecord(
        start_s=0.0,
        num_output_tokens=11,
        ttft_s=ttft_s,
        e2e_s=ttft_s + 10 * tpot_s,
        error=error,
    )


def test_attainment_and_goodput_per_phase_use_each_phase_slo():
    phases = [
        {"name": "a", "duration_s": 10.0, "rate": 0.4, "start_s": 0.0, "num_requests": 4,
         "slo_ttft_ms": 100.0, "slo_tpot_ms": 50.0},
        {"name": "b", "duration_s": 5.0, "rate": 0.6, "start_s": 10.0, "num_requests": 3,
         "slo_ttft_ms": 1000.0, "slo_tpot_ms": 20.0},
    ]  # fmt: skip
    records = [
        record(0.05, 0.04),  # a: met
        record(0.05, 0.04),  # a: met
        record(0.5, 0.04),  # a: TTFT missed (it would meet b's SLO)
        record(0.05, 0.04, error="HTTP 500: boom"),  # a: an error is a miss
        record(0.5, 0.01),  # b: met
        record(0.05, 0.04),  # b: TPOT missed (it would meet a's SLO)
        record(0.9, 0.019),  # b: met
    ]
    result = RunResult({"phases": phases}, records, 15.0)
    a, b, whole = summarize_phases(result)
    assert (a.num_met, a.num_requests, a.num_errors) == (2, 4, 1)
    assert (a.attainment, a.goodput) == (0.5, 0.2)
    assert (b.num_met, b.attainment, b.goodput) == (2, pytest.approx(2 / 3), 0.4)
    assert (whole.name, whole.num_met, whole.num_requests) == ("all", 4, 7)
    assert (whole.attainment, whole.goodput) == (pytest.approx(4 / 7), pytest.approx(4 / 15))
    table = format_phases([a, b, whole])
    assert "50.0%" in table and "each phase's" in table
    with pytest.raises(ConfigError, match="do not match"):
        summarize_phases(RunResult({"phases": phases}, records[:-1], 15.0))
