"""The simulator against hand-computed timelines, and proof that pdserve's own scheduler,
block manager and routing policy decide what happens.

Costs (tests/sim/builders.py): a step of N tokens takes 10 ms + 0.1 ms per token past the
first; every message takes 1 ms; the KV hand-over 5 ms.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.bench.loadgen import Arrival
from pdserve.bench.types import RequestSpec
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.router.policy import plan_request
from pdserve.sim import router_side
from pdserve.sim.cluster import ClusterSim
from pdserve.sim.run import simulate
from pdserve.sim.worker import make_request, sampled_token
from tests.sim.builders import layout, make_profile, spec

ALL_AT_ONCE = Arrival.poisson(float("inf"))


def run(serve, specs, arrival=ALL_AT_ONCE, profile=None, **kw):
    return simulate(serve, profile or make_profile(), specs, arrival, num_requests=len(specs), **kw)


def test_one_request_aggregated_exact_ttft_and_tpot():
    record = run(layout("aggregated"), [spec(100, 5)]).records[0]
    # AddRequest arrives at 1 ms; prefill of 101 tokens 20 ms; token to the router 1 ms.
    assert record.ttft_s == pytest.approx(0.022)
    assert record.itl_s == pytest.approx([0.010] * 4)  # decode steps of one token
    assert record.e2e_s == pytest.approx(0.062)
    assert record.tpot_s == pytest.approx(0.010)
    assert (record.num_prompt_tokens, record.num_output_tokens) == (101, 5)


def test_one_request_disaggregated_exact_hand_over():
    serve = layout("disaggregated", kv_layerwise=False)
    record = run(serve, [spec(100, 5)]).records[0]
    # ReserveKV 1 ms, KVReserved 1 ms, PrefillRequest 1 ms, prefill 20 ms, token 1 ms.
    assert record.ttft_s == pytest.approx(0.024)
    # KVDone reaches the decode worker at 23 + 1 + 5 ms; its first step ends 10 ms later.
    assert record.itl_s == pytest.approx([0.016, 0.010, 0.010, 0.010], abs=1e-9)
    assert record.e2e_s == pytest.approx(0.070, abs=1e-9)


def test_workers_sharing_one_core_run_at_half_speed():
    serve = dataclasses.replace(layout("aggregated"), mixed_workers=2, routing_policy="round_robin")
    records = run(
        serve, [spec(100, 3), spec(100, 3, first="beta")], profile=make_profile(cores=1)
    ).records
    for record in records:
        assert record.ttft_s == pytest.approx(0.001 + 0.040 + 0.001)
        assert record.itl_s == pytest.approx([0.020, 0.020])


def test_a_prefix_hit_skips_the_cached_blocks():
    specs = [
        dataclasses.replace(spec(100, 2), timestamp_s=0.0),
        dataclasses.replace(spec(100, 2), timestamp_s=1.0),
    ]
    first, second = run(layout("aggregated"), specs, Arrival.trace()).records
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 96)
    # 5 tokens left to compute: 10 ms + 0.4 ms.
    assert second.ttft_s == pytest.approx(0.001 + 0.0104 + 0.001)


@pytest.mark.parametrize(("policy", "num_cached"), [("kv_aware", 96), ("round_robin", 0)])
def test_the_routing_policy_decides_where_a_repeat_goes(policy, num_cached):
    serve = dataclasses.replace(layout("aggregated"), mixed_workers=2, routing_policy=policy)
    specs = [
        dataclasses.replace(spec(100, 2), timestamp_s=0.0),
        dataclasses.replace(spec(100, 2), timestamp_s=1.0),
    ]
    records = run(serve, specs, Arrival.trace()).records
    assert records[1].num_cached_tokens == num_cached


def test_preemption_happens_exactly_as_the_real_scheduler_does_it():
    serve = layout("aggregated", num_blocks=10)
    specs = [spec(32, 100), spec(32, 100, first="beta")]
    sim = ClusterSim(serve, make_profile())
    flights = [sim.dispatch(i, s_ids, 100) for i, s_ids in enumerate(_ids(specs))]
    sim.run()
    worker = sim.workers["mixed-0"]
    assert isinstance(worker.scheduler, Scheduler)
    assert worker.num_preemptions == _direct_preemptions(_ids(specs), 100, num_blocks=10)
    assert worker.num_preemptions > 0
    assert [f.record.num_output_tokens for f in flights] == [100, 100]
    assert worker.block_manager.num_free_blocks == 10  # nothing leaked


def _ids(specs: list[RequestSpec]) -> list[list[int]]:
    from pdserve.sim.tokens import stand_in_ids

    return [stand_in_ids(s) for s in specs]


def _direct_preemptions(prompts: list[list[int]], max_tokens: int, num_blocks: int) -> int:
    """The engine's scheduler driven by hand, as EngineCore.step drives it."""
    scheduler = Scheduler(SchedulerConfig(64, 2048), BlockManager(num_blocks, 16))
    for i, ids in enumerate(prompts):
        scheduler.add_request(make_request(f"req-{i}", ids, max_tokens, 0.0))
    num_preempted = 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        num_preempted += len(out.preempted_ids)
        tokens = {
            s.request.request_id: sampled_token(s.request) for s in out.scheduled if s.is_sampling
        }
        scheduler.update_from_output(out, tokens)
    return num_preempted


def test_the_router_plans_with_the_real_policy(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        plan = plan_request(*args, **kwargs)
        calls.append(plan.placement)
        return plan

    monkeypatch.setattr(router_side, "plan_request", spy)
    run(layout("auto"), [spec(20, 2), spec(600, 2, first="beta")])
    # auto: a short prompt on an idle decode worker stays local; a long one goes remote.
    assert calls == [("local", "decode_idle"), ("remote", "long_uncached")]


def test_a_request_too_long_for_the_model_is_an_error_record():
    record = run(layout("aggregated"), [spec(5000, 2)]).records[0]
    assert record.error.startswith("HTTP 400")


def test_the_same_seed_gives_the_same_run():
    from pdserve.bench.metrics import to_json
    from pdserve.bench.workloads import get_workload

    specs = get_workload("chat").sample(30, seed=0)
    runs = [
        to_json(
            simulate(
                layout("auto"), make_profile(), specs, Arrival.poisson(5.0), num_requests=30, seed=s
            )
        )
        for s in (0, 0, 1)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_background_load_takes_its_share_of_the_cores():
    # Two other busy threads on two cores: our one thread gets 2/3 of a core.
    record = run(layout("aggregated"), [spec(100, 2)], background_load=2.0).records[0]
    assert record.ttft_s == pytest.approx(0.001 + 0.020 * 1.5 + 0.001)
    assert record.itl_s == pytest.approx([0.015])


def test_workers_on_their_own_devices_do_not_share():
    profile = make_profile(cores=1)
    profile = dataclasses.replace(profile, hardware={**profile.hardware, "device": "gpu"})
    serve = dataclasses.replace(layout("aggregated"), mixed_workers=2, routing_policy="round_robin")
    records = run(serve, [spec(100, 3), spec(100, 3, first="beta")], profile=profile).records
    for record in records:
        assert record.ttft_s == pytest.approx(0.022)
        assert record.itl_s == pytest.approx([0.010, 0.010])
