"""The planner: candidates, replicas under a budget, the known optimum of a small space."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pdserve.bench.types import SLO
from pdserve.cli import main
from pdserve.serve import ServeConfig
from pdserve.sim import plan as planner
from pdserve.sim.cost_model import StepCost
from pdserve.sim.search import SearchSettings
from tests.sim.builders import make_profile, spec

SPACE = planner.SearchSpace(chunk_sizes=(512,), max_num_seqs=(64,))
# 50 ms a step + 0.1 ms a token: with 4 requests at most per worker, a few req/s each.
SLOW = StepCost((1, 1001), (0.050, 0.150), 0.0, 0.0, 0.0)


def test_candidates_use_every_core_of_the_unit():
    labels = [c.label for c in planner.candidates(make_profile(cores=4, sizes=(1, 2)), SPACE)]
    assert labels == [
        "aggregated 4 mixed x1, chunk 512, seqs 64",
        "disaggregated 1P:3D x1, chunk 512, seqs 64",
        "disaggregated 2P:2D x1, chunk 512, seqs 64",
        "disaggregated 3P:1D x1, chunk 512, seqs 64",
        "auto 1P:3D x1, chunk 512, seqs 64",
        "auto 2P:2D x1, chunk 512, seqs 64",
        "auto 3P:1D x1, chunk 512, seqs 64",
        "aggregated 2 mixed x2, chunk 512, seqs 64",
        "disaggregated 1P:1D x2, chunk 512, seqs 64",
        "auto 1P:1D x2, chunk 512, seqs 64",
    ]


def test_budget_buys_whole_units():
    profile = make_profile(cores=2)
    assert planner.replicas(profile, planner.Budget(cores=2001), None) == 1000
    assert planner.replicas(profile, planner.Budget(nodes=7, per_hour=10.0), 2.0) == 5
    assert planner.replicas(profile, planner.Budget(), None) == 1


def test_the_planner_finds_the_known_optimum():
    # A second thread does not speed a worker up here, so two one-thread workers serve
    # about twice what one two-thread worker does: the planner must pick them.
    profile = make_profile(SLOW, cores=2, sizes=(1, 2))
    space = dataclasses.replace(SPACE, modes=("aggregated",), max_num_seqs=(4,))
    specs = [spec(100, 20, first=f"p{i}") for i in range(40)]
    plans = planner.make_plans(
        [(profile, 1.0)],
        specs,
        SLO(ttft_ms=1000, tpot_ms=100),
        planner.Budget(cores=20),
        space,
        settings=SearchSettings(min_duration_s=5.0),
    )
    best, other = plans
    assert best.candidate.label == "aggregated 2 mixed x1, chunk 512, seqs 4"
    assert best.unit_goodput > 1.5 * other.unit_goodput
    assert best.replicas == 10 and best.goodput == pytest.approx(10 * best.unit_goodput)
    assert best.output_throughput == pytest.approx(20 * best.unit_goodput)  # 20 out each
    expected = 1.0 / (best.output_throughput * 3600) * 1e6
    assert best.cost_per_million_output_tokens == pytest.approx(expected)


def test_launch_yaml_is_a_serve_config_of_the_plan():
    candidate = planner.candidates(make_profile(cores=2), SPACE)[1]
    plan = planner.Plan(candidate, 1.0, False, 10.0, 1, None)
    serve = ServeConfig.from_dict(yaml.safe_load(planner.launch_yaml(plan)))
    assert serve == candidate.serve


def test_plan_cli_writes_the_best_yaml(tmp_path, capsys):
    profile = make_profile(SLOW)
    path = tmp_path / "profile.json"
    profile.save(path)
    out = tmp_path / "best.yaml"
    args = ["plan", "--profile", str(path), "--workload", "random:in=64,out=16"]
    args += ["--num-specs", "60", "--modes", "aggregated", "--chunk-sizes", "512"]
    args += ["--max-num-seqs", "4"]
    args += ["--budget-cores", "8", "--yaml-out", str(out), "--price-per-hour", "0.5"]
    args += ["--min-duration", "5"]
    assert main(args) == 0
    assert ServeConfig.from_dict(yaml.safe_load(out.read_text())).mode == "aggregated"
    assert "x4 replicas" in capsys.readouterr().out


def test_a_large_unit_is_ranked_from_phase_rates_and_its_best_checked_whole():
    profile = make_profile(SLOW, cores=4, sizes=(1,))
    space = dataclasses.replace(SPACE, max_num_seqs=(4,))
    specs = [spec(100, 20, first=f"p{i}") for i in range(40)]
    plans = planner.make_plans(
        [(profile, None)],
        specs,
        SLO(ttft_ms=1000, tpot_ms=100),
        planner.Budget(),
        space,
        settings=SearchSettings(min_duration_s=5.0),
        exhaustive_limit=2,
        num_verified=1,
    )
    assert len(plans) == 7  # 4 mixed; 1:3, 2:2, 3:1 disaggregated and auto
    assert [p.is_estimate for p in plans].count(False) == 1
    # Four one-thread mixed workers: four times one worker's rate.
    mixed = next(p for p in plans if p.candidate.serve.mode == "aggregated")
    assert mixed.unit_goodput > 0
