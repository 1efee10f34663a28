"""Sweeps: YAML validation naming the field, ranking by goodput per core, and one sweep
end to end against a real `pdserve serve` with a stubbed goodput search."""

from __future__ import annotations

import argparse
import json
import urllib.request

import pytest
import yaml

from pdserve.bench.goodput import GoodputResult, Probe, search_goodput
from pdserve.bench.launcher import descendants
from pdserve.bench.sweep import (
    ConfigurationResult,
    SweepResult,
    cmd_sweep,
    format_ranking,
    run_sweep,
)
from pdserve.bench.sweep_spec import SearchSettings, SweepSpec, WorkloadSpec
from pdserve.bench.types import SLO
from pdserve.errors import ConfigError
from tests.bench.report_builders import Page, make_run, make_summary

TINY = {  # the smallest server that answers: one mixed worker, one thread, few blocks
    "name": "tiny",
    "mode": "aggregated",
    "mixed_workers": 1,
    "threads_per_worker": 1,
    "log_level": "WARNING",
    "engine": {"num_kv_blocks": 64, "max_num_seqs": 4},
}


def spec_dict(**changes) -> dict:
    data = {
        "configurations": [dict(TINY)],
        "workloads": ["chat", {"name": "code", "slo": {"ttft_ms": 500, "tpot_ms": 80}}],
        "search": {"attainment": 0.9, "num_requests": 8, "cores": 2},
    }
    data.update(changes)
    return data


# ---- validation -----------------------------------------------------------------------


def with_config(**settings) -> dict:
    return spec_dict(configurations=[{**TINY, **settings}])


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (with_config(engine={"max_num_seqs": "many"}), "configurations[0].engine.max_num_seqs"),
        (with_config(engine={"block_size": 0}), "configurations[0].engine.block_size"),
        (with_config(mode="sideways"), "configurations[0].mode"),
        (with_config(colour="blue"), "configurations[0].colour"),
        (with_config(port=8000), "configurations[0].port"),
        (with_config(name="a b"), "configurations[0].name"),
        (spec_dict(configurations=[TINY, TINY]), "configurations[1].name"),
        (spec_dict(configurations=[]), "configurations"),
        (spec_dict(configurations={"mode": "auto"}), "configurations"),
        (spec_dict(workloads=["chat", "poetry"]), "workloads[1].name"),
        (
            spec_dict(workloads=[{"name": "chat", "slo": {"ttft_ms": "1s"}}]),
            "workloads[0].slo.ttft_ms",
        ),
        (
            spec_dict(workloads=[{"name": "chat", "slo": {"ttft_ms": 9}}]),
            "workloads[0].slo.tpot_ms",
        ),
        (spec_dict(workloads=[{"name": "chat", "rate": 2}]), "workloads[0].rate"),
        (spec_dict(search={"attainment": 1.5}), "search.attainment"),
        (spec_dict(search={"num_requests": "10"}), "search.num_requests"),
        (spec_dict(search={"num_requests": 0}), "search.num_requests"),
        (spec_dict(search={"patience": 3}), "search.patience"),
        (spec_dict(configuration=[TINY]), "configuration"),
    ],
)
def test_validation_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        SweepSpec.from_dict(data)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(field + ": ")


def test_defaults_and_cores_per_configuration():
    spec = SweepSpec.from_dict(
        {
            "configurations": [
                {"mode": "aggregated", "threads_per_worker": 2},
                {"mode": "disaggregated", "threads_per_worker": 1},
                {"mode": "aggregated", "threads_per_worker": 1},
                {"mode": "disaggregated", "decode_workers": 3, "threads_per_worker": 1},
            ],
            "search": {"cores": 2},
        }
    )
    assert [s.name for s in spec.configurations] == [
        "0-aggregated",
        "1-disaggregated",
        "2-aggregated",
        "3-disaggregated",
    ]
    assert [spec.num_cores(s) for s in spec.configurations] == [2, 2, 1, 2]  # capped at 2
    assert spec.workloads == (WorkloadSpec("chat"),)
    assert spec.search == SearchSettings(cores=2)
    assert spec.configurations[0].settings == {"mode": "aggregated", "threads_per_worker": 2}


# ---- ranking --------------------------------------------------------------------------


def found(goodput: float, is_bracketed: bool = True) -> GoodputResult:
    probes = (Probe(goodput, make_summary()),) if goodput else ()
    if is_bracketed:  # and a rate above it that failed
        probes += (Probe(goodput * 2 or 1.0, make_summary(slo_attainment=0.5)),)
    return GoodputResult(goodput, SLO(200.0, 30.0), 0.9, 2, probes)


def test_ranking_by_geometric_mean_of_goodput_per_core():
    spec = SweepSpec.from_dict(
        spec_dict(configurations=[{"name": n, "mode": "aggregated"} for n in "abcd"])
    )
    a = ConfigurationResult("a", {}, 2, searches={"chat": found(2.0), "code": found(8.0)})
    b = ConfigurationResult("b", {}, 1, searches={"chat": found(2.0), "code": found(1.0)})
    c = ConfigurationResult(
        "c", {}, 2, searches={"chat": found(4.0, is_bracketed=False), "code": found(0.0)}
    )
    d = ConfigurationResult("d", {}, 2, is_ok=False, error="server exited with code 1")
    sweep = SweepResult(spec, [a, b, c, d])
    assert a.score(["chat", "code"]) == pytest.approx(2.0)  # sqrt(1 * 4)
    assert [r.name for r in sweep.ranking()] == ["a", "b", "c", "d"]
    assert format_ranking(sweep).splitlines() == [
        "rank  configuration  cores  goodput/core (geo-mean)  chat req/s (/core)  code req/s (/core)  status",
        "----  -------------  -----  -----------------------  ------------------  ------------------  ------",
        "1     a                  2                    2.000       2.000 (1.000)       8.000 (4.000)      ok",
        "2     b                  1                    1.414       2.000 (2.000)       1.000 (1.000)      ok",
        "3     c                  2                    0.000     >=4.000 (2.000)       0.000 (0.000)      ok",
        "4     d                  2                    0.000                   -                   -  FAILED",
    ]


# ---- end to end -----------------------------------------------------------------------


class StubSearch:
    """Checks the server is really up (a completion through it), then runs the real
    search loop over made-up runs whose TTFT grows with the rate."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, url, workload, settings, num_cores) -> GoodputResult:
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        request = urllib.request.Request(
            url + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.load(r)["usage"]["completion_tokens"] == 2
        self.calls.append((url, workload.name, num_cores))
        slo = workload.slo or SLO(200.0, 30.0)
        return search_goodput(
            lambda rate: make_run(workload.name, ttft_ms=100.0 * rate),
            slo,
            attainment=settings.attainment,
            max_probes=4,
            num_cores=num_cores,
        )


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, builtin_model_dir):
    out = tmp_path_factory.mktemp("sweep")
    broken = {"name": "broken", "mode": "aggregated", "model": str(out / "no-such-model")}
    spec = SweepSpec.from_dict(spec_dict(configurations=[broken, TINY]))
    search, lines = StubSearch(), []
    sweep = run_sweep(spec, out, search=search, log=lines.append)
    return out, sweep, search, lines


def test_sweep_starts_searches_and_stops_each_server(sweep_run):
    _, sweep, search, _ = sweep_run
    tiny = sweep.results[1]
    assert [(w, cores) for _, w, cores in search.calls] == [("chat", 1), ("code", 1)]
    assert len({url for url, _, _ in search.calls}) == 1
    assert tiny.is_ok and tiny.error is None and tiny.workload_errors == {}
    assert len(tiny.server_pids) == 2  # the launcher and its one worker
    assert not any(_alive(pid) for pid in tiny.server_pids)  # no orphans
    assert tiny.killed_pids == []  # ... and none had to be killed
    # Made-up runs: 20 requests of TTFT 100*rate + i ms (i < 20), plus one error: 95 %
    # at best. Chat (TTFT <= 200 ms): 2 fails, then bisection; code (500 ms): 8 fails.
    assert [p.rate for p in tiny.searches["chat"].probes] == [1.0, 2.0, 1.5, 1.75]
    assert tiny.searches["chat"].goodput == 1.75
    assert [p.rate for p in tiny.searches["code"].probes] == [1.0, 2.0, 4.0, 8.0]
    assert tiny.searches["code"].goodput == 4.0


def test_a_server_that_fails_to_start_is_recorded_and_the_sweep_goes_on(sweep_run):
    out, sweep, _, lines = sweep_run
    broken = sweep.results[0]
    assert not broken.is_ok and broken.searches == {}
    assert broken.error.startswith("server exited with code 1")
    assert any("config.json" in line for line in broken.log_tail)  # why, from its log
    assert (out / "logs" / "broken.log").read_text().splitlines()[-1] == broken.log_tail[-1]
    assert lines[0] == "[1/2] broken: starting pdserve serve"
    assert lines[1] == "[2/2] tiny: starting pdserve serve"


def test_sweep_ranking_and_reports(sweep_run):
    out, sweep, _, _ = sweep_run
    assert [r.name for r in sweep.ranking()] == ["tiny", "broken"]
    data = json.loads((out / "sweep.json").read_text())  # written after each configuration
    assert data["ranking"] == ["tiny", "broken"]
    assert data["configurations"][0]["is_ok"] is False
    tiny = data["configurations"][1]
    assert tiny["score"] == pytest.approx((1.75 * 4.0) ** 0.5)  # 1 core: goodput = per core
    assert [p["rate"] for p in tiny["searches"]["code"]["probes"]] == [1.0, 2.0, 4.0, 8.0]

    from pdserve.bench.sweep import write_html

    page = Page(write_html(sweep, out / "sweep.html").read_text())
    assert page.sections == [
        "ranking",
        "configurations",
        "config",
        "summary",
        "latency",
        "percentiles",
        "goodput",
        "comparison",
    ]
    assert page.tables[0][1][:2] == ["1", "tiny"]
    assert page.tables[0][2][-1] == "FAILED"
    assert page.svg_titles[-1] == "Ratios to tiny/chat"


def test_cmd_sweep_dry_run_prints_the_plan(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec_dict(), sort_keys=False))
    args = argparse.Namespace(config=str(path), out=str(tmp_path / "out"), dry_run=True)
    assert cmd_sweep(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: {'mode': 'aggregated'")
    assert "(1 cores)" in out and "workloads: chat, code" in out
    assert not (tmp_path / "out").exists()


def _alive(pid: int) -> bool:
    return bool(descendants(pid))  # empty once the process is gone (or a zombie)
