"""`pdserve bench run|goodput|compare` end to end through `pdserve.cli.main`, against the
live server of `conftest.py`, with the built-in `random` workload."""

from __future__ import annotations

import json

from pdserve.bench import goodput, metrics
from pdserve.bench.workloads import get_workload
from pdserve.cli import main

WORKLOAD = "random:in=16,out=8"


def bench(live_server, *args: str) -> list[str]:
    return ["bench", *args, "--url", live_server.url, "--workload", WORKLOAD, "--no-progress"]


def test_run_writes_a_run_that_summarises_the_same(live_server, live_model, tmp_path, capsys):
    out = tmp_path / "run.json"
    args = ["run", "--concurrency", "2", "--num-requests", "4", "--ignore-eos"]
    args += ["--price-per-hour", "2.5", "--label", "a", "--out", str(out)]
    assert main(bench(live_server, *args)) == 0
    printed = capsys.readouterr().out
    assert "requests            4 (4 ok, 0 errors)" in printed
    data = json.loads(out.read_text())
    run = metrics.from_json(out.read_text())
    slo = get_workload(WORKLOAD).default_slo  # no --slo-*: the workload's
    assert (run.config["model"], run.config["arrival"], run.config["concurrency"]) == (
        live_model, "concurrency", 2,
    )  # fmt: skip
    assert (run.config["slo_ttft_ms"], run.config["slo_tpot_ms"]) == (slo.ttft_ms, slo.tpot_ms)
    assert run.config["extra_body"] == {"ignore_eos": True}
    assert [r.num_output_tokens for r in run.records] == [8] * 4
    summary = metrics.summarize(run, slo, price_per_hour=2.5)
    assert metrics.summary_from_dict(data["summary"]) == summary
    assert main(["bench", "compare", str(out), str(out)]) == 0  # bench/report.py reads it
    assert "output throughput" in capsys.readouterr().out


def test_goodput_prints_and_saves_its_probes(live_server, tmp_path, capsys):
    out = tmp_path / "goodput.json"
    args = ["goodput", "--num-requests", "4", "--start-rate", "50", "--max-probes", "2"]
    args += ["--slo-ttft", "60000", "--slo-tpot", "60000", "--cores", "2", "--out", str(out)]
    assert main(bench(live_server, *args)) == 0
    result = goodput.goodput_from_dict(json.loads(out.read_text()))
    # SLOs no run can miss: 50 and 100 req/s both pass; two probes is the bound.
    assert [p.rate for p in result.probes] == [50.0, 100.0]
    assert (result.goodput, result.goodput_per_core) == (100.0, 50.0)
    assert result.is_lower_bound  # nothing failed: the budget ran out first
    assert (
        "goodput: >= 100.000 req/s per machine, 50.000 req/s per core (2 cores)"
        " — every probe passed: a lower bound"
    ) in capsys.readouterr().out


def test_half_an_slo_without_defaults_is_refused(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 8, "output_length": 4}\n')
    args = ["bench", "goodput", "--trace", str(trace), "--slo-ttft", "100", "--model", "m"]
    assert main(args) == 2
    assert "slo: give both --slo-ttft and --slo-tpot" in capsys.readouterr().err


def test_run_with_phases_reports_each_phase(live_server, tmp_path, capsys):
    phases = tmp_path / "phases.yaml"
    phases.write_text(
        "phases:\n"
        "  - {workload: 'random:in=16,out=4', duration_s: 0.5, rate: 8}\n"
        "  - {name: second, workload: 'random:in=32,out=4', duration_s: 0.5, rate: 8,\n"
        "     slo: {ttft_ms: 60000, tpot_ms: 60000}}\n"
        "seed: 2\n"
    )
    out = tmp_path / "run.json"
    args = ["bench", "run", "--url", live_server.url, "--phases", str(phases), "--ignore-eos"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    counts = [p["num_requests"] for p in data["config"]["phases"]]
    assert [p["name"] for p in data["phases"]] == ["random:in=16,out=4", "second", "all"]
    assert [p["num_requests"] for p in data["phases"]] == [*counts, sum(counts)]
    assert data["phases"][1]["attainment"] == 1.0  # an SLO no request can miss
    assert [r["num_output_tokens"] for r in data["records"]] == [4] * sum(counts)
    assert "second" in printed and "each phase's" in printed
    assert main([*args, "--rate", "3"]) == 2  # the file sets the load
    assert "drop --rate" in capsys.readouterr().err
