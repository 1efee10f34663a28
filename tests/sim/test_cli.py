"""`pdserve profile`, `pdserve sim`: command-line round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pdserve.bench import metrics
from pdserve.cli import main
from pdserve.sim.profile import Profile
from tests.sim.builders import make_profile


@pytest.fixture()
def profile_path(tmp_path):
    path = tmp_path / "profile.json"
    make_profile().save(path)
    return path


def test_sim_writes_a_bench_run_that_compare_reads(tmp_path, profile_path, capsys):
    runs = []
    for mode in ("aggregated", "disaggregated"):
        out = tmp_path / f"{mode}.json"
        args = ["sim", "--profile", str(profile_path), "--mode", mode, "--threads-per-worker", "1"]
        args += ["--workload", "code", "--rate", "4", "--num-requests", "20", "--out", str(out)]
        assert main(args) == 0
        runs.append(out)
    result = metrics.from_json(runs[0].read_text())
    assert len(result.records) == 20 and all(r.is_ok for r in result.records)
    assert result.config["simulated"] is True
    assert result.config["layout"]["mode"] == "aggregated"
    assert result.config["slo_ttft_ms"] == 400  # the code workload's default
    html = tmp_path / "compare.html"
    assert main(["bench", "compare", *map(str, runs), "--html", str(html)]) == 0
    assert html.stat().st_size > 0
    assert "simulated" in capsys.readouterr().out


def test_sim_reads_a_serve_yaml(tmp_path, profile_path):
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text("mode: aggregated\nmixed_workers: 2\nthreads_per_worker: 1\n")
    out = tmp_path / "run.json"
    args = ["sim", "--profile", str(profile_path), "--config", str(serve_yaml)]
    args += ["--workload", "random:in=64,out=8", "--num-requests", "5", "--out", str(out)]
    assert main(args) == 0
    layout = json.loads(out.read_text())["config"]["layout"]
    assert layout == {**layout, "mode": "aggregated", "mixed_workers": 2}


def test_sim_rejects_a_thread_count_the_profile_lacks(profile_path, capsys):
    args = ["sim", "--profile", str(profile_path), "--threads-per-worker", "4"]
    assert main([*args, "--num-requests", "2"]) == 2
    assert "threads_per_worker" in capsys.readouterr().err


def test_analytic_profile_round_trip(tmp_path, builtin_model_dir):
    out = tmp_path / "h100.yaml"
    assert main(["profile", "--analytic", "h100", "--sizes", "1,2", "--out", str(out)]) == 0
    profile = Profile.load(out)
    assert profile.kind == "analytic" and profile.sizes == [1, 2]
    assert profile.hardware["name"] == "H100-SXM5-80GB"
    assert "ESTIMATE" in profile.notes[0]


def test_measured_quick_profile(tmp_path, builtin_model_dir):
    out = tmp_path / "quick.json"
    assert main(["profile", "--quick", "--threads", "1", "--out", str(out)]) == 0
    profile = Profile.load(out)
    assert profile.kind == "measured" and profile.sizes == [1]
    assert profile.model["name"] == builtin_model_dir.name
    assert profile.model["kv_bytes_per_token"] == 2 * 8 * 4 * 64 * 4  # fp32, 8 layers, 4 heads
    assert profile.hardware["cores"] >= 1 and profile.hardware["cpu_model"]
    # Timings are noisy on a shared machine: check what was measured, not how fast.
    assert profile.cost(1).token_knots == (1, 4, 16, 64, 256, 1024)
    samples = profile.checks["runs"]["1"]["samples"]
    assert len(samples) == 11 and all(s["seconds"] > 0 for s in samples)
    assert set(profile.transfer) >= {"shm", "tcp"}


def test_merge_keeps_the_fastest_sample_of_each_shape(tmp_path):
    from pdserve.sim.measure import merge_fastest

    def measured(scale: float) -> Profile:
        samples = [
            {
                "kind": "prefill",
                "num_decodes": 0,
                "decode_context": 0,
                "prefill_tokens": q,
                "prefill_context": c,
                "seconds": scale * (0.01 + 1e-4 * q + 1e-7 * q * (q + c)),
            }
            for q, c in ((16, 0), (64, 0), (64, 512))
        ] + [
            {
                "kind": "decode",
                "num_decodes": b,
                "decode_context": c,
                "prefill_tokens": 0,
                "prefill_context": 0,
                "seconds": scale * (0.01 + 1e-4 * b + 1e-6 * b * (c + 1)),
            }
            for b, c in ((1, 64), (16, 64), (16, 512), (64, 64))
        ]
        run = {"model_dir": "x", "dtype": "float32", "samples": samples, "copy": []}
        return dataclasses.replace(make_profile(), checks={"runs": {"1": run}})

    slow, fast = measured(2.0), measured(1.0)
    merged = merge_fastest([slow, fast])
    samples = merged.checks["runs"]["1"]["samples"]
    assert sorted(s["seconds"] for s in samples) == sorted(
        s["seconds"] for s in fast.checks["runs"]["1"]["samples"]
    )
    assert merged.cost(1).token_knots == (1, 16, 64)


def test_profile_takes_front_end_costs_from_frontend_cost_json(tmp_path, capsys):
    source = tmp_path / "measured.json"
    dataclasses.replace(make_profile(), checks={"runs": {}}).save(source)
    frontend = tmp_path / "frontend.json"
    frontend.write_text(
        json.dumps(
            {
                "router_s_per_request": 0.003,
                "router_s_per_token": 0.0004,
                "client_s_per_request": 0.005,
                "client_s_per_token": -0.0001,  # noise below zero: router + client clipped
            }
        )
    )
    out = tmp_path / "with_frontend.json"
    assert (
        main(["profile", "--merge", str(source), "--frontend", str(frontend), "--out", str(out)])
        == 0
    )
    profile = Profile.load(out)
    assert profile.frontend_s_per_request == pytest.approx(0.008)
    assert profile.frontend_s_per_token == pytest.approx(0.0003)
    assert profile.frontend_s_per_step == 0.0  # an older measurement: no step messages
    frontend.write_text(
        json.dumps(
            {
                "router_s_per_request": 0.003,
                "router_s_per_token": 0.0001,
                "router_s_per_step": 0.0006,
                "client_s_per_request": 0.005,
                "client_s_per_token": 0.0002,
                "client_s_per_step": 0.0,
            }
        )
    )
    assert (
        main(["profile", "--merge", str(source), "--frontend", str(frontend), "--out", str(out)])
        == 0
    )
    profile = Profile.load(out)  # and the saved profile keeps it
    assert profile.frontend_s_per_token == pytest.approx(0.0003)
    assert profile.frontend_s_per_step == pytest.approx(0.0006)
    frontend.write_text(json.dumps({"router_s_per_request": 0.003}))
    assert (
        main(["profile", "--merge", str(source), "--frontend", str(frontend), "--out", str(out)])
        != 0
    )
    assert "frontend_cost.py" in capsys.readouterr().err


def test_merge_refits_both_contention_factors_from_the_samples():
    from pdserve.sim.measure import merge_fastest

    def shape(kind: str, rows: int, prefill: int, seconds: float) -> dict:
        return {
            "kind": kind,
            "num_decodes": rows,
            "decode_context": 64 if rows else 0,
            "prefill_tokens": prefill,
            "prefill_context": 0,
            "seconds": seconds,
        }

    # Alone: a 256-token prefill of 150 ms, a one-row decode of 10 ms (all weights' read),
    # a 16-row decode of 25 ms. Together, read x1.5 and compute x1.2 (each child):
    # prefill 10 * 1.5 + 140 * 1.2 = 183 ms, decodes 15 ms and 15 + 15 * 1.2 = 33 ms.
    alone = [shape("prefill", 0, 256, 0.150), shape("decode", 1, 0, 0.010)]
    alone.append(shape("decode", 16, 0, 0.025))
    slowdowns = [0.183 / 0.150, 0.015 / 0.010, 0.033 / 0.025] * 2
    old = dataclasses.replace(  # stored before compute_contention: one factor only
        make_profile(),
        contention=2.0,
        checks={"runs": {}, "contention": {"alone": alone, "slowdowns": slowdowns}},
    )
    merged = merge_fastest([old])
    assert merged.contention == pytest.approx(1.5)
    assert merged.compute_contention == pytest.approx(1.2)
