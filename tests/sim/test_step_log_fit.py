"""Calibrating on a real run's step log (sim/step_log_fit.py): the worker loop's time
between steps and the simulator charging it on every step, steps that overlapped another
worker's, and the trimmed fit recovering a known cost from steps of which some were slowed
by another program; the host's slowdown per window, measured and replayed
(sim/host_trace.py). Hand-computed."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.bench.loadgen import Arrival
from pdserve.sim.cost_model import StepCost, StepShape
from pdserve.sim.host_trace import HostSlowdown, from_step_logs
from pdserve.sim.run import simulate
from pdserve.sim.step_log_fit import (
    alone,
    contention_from_logs,
    fit_step_log,
    loop_overhead_s,
    overheads,
    with_step_overhead,
)
from tests.sim.builders import layout, make_profile, one_request, spec


def step(t: float, execute: float, schedule: float = 0.0001, update: float = 0.0002) -> dict:
    return {"t": t, "schedule": schedule, "execute": execute, "update": update}


def test_overhead_is_schedule_update_and_the_gap_to_the_next_step():
    records = [
        step(0.0, 0.010),  # ends at 0.0103; next starts 0.2 ms later
        step(0.0105, 0.010),  # ends at 0.0208; next starts 0.6 ms later
        step(0.0214, 0.010),  # ends at 0.0217; the next one 1 s later: idle, left out
        step(1.0217, 0.010),
    ]
    assert overheads(records) == pytest.approx([0.0005, 0.0009])
    assert loop_overhead_s([records, [step(0.0, 0.01), step(0.0108, 0.01)]]) == pytest.approx(
        0.0008  # the median of 0.5, 0.9 and 0.8 ms
    )


def test_no_consecutive_steps_is_an_error():
    with pytest.raises(ValueError, match="no two consecutive"):
        loop_overhead_s([[step(0.0, 0.01)]])


def test_the_simulator_adds_it_to_every_step():
    profile = with_step_overhead(make_profile(), 0.002)
    assert {c.step_overhead_s for c in profile.costs.values()} == {0.002}
    serve = layout("aggregated")
    record = simulate(
        serve, profile, [spec(100, 5)], Arrival.poisson(float("inf")), num_requests=1
    ).records[0]
    # AddRequest 1 ms; prefill of 101 tokens 20 ms + 2 ms; token to the router 1 ms.
    assert record.ttft_s == pytest.approx(0.024)
    assert record.itl_s == pytest.approx([0.012] * 4)  # each decode step 10 + 2 ms


def logged(t: float, execute: float, tokens: int, sampled: int, pa: int, dc: int) -> dict:
    return {
        "t": t,
        "schedule": 0.0,
        "execute": execute,
        "update": 0.0,
        "tokens": tokens,
        "sampled": sampled,
        "prefill_attention": pa,
        "decode_context": dc,
        "threads": 1,
    }


def test_steps_that_overlap_another_workers_step_are_not_alone():
    a = [logged(0.0, 0.010, 1, 1, 0, 10), logged(0.020, 0.010, 1, 1, 0, 11)]
    b = [logged(0.025, 0.010, 1, 1, 0, 10), logged(0.050, 0.010, 1, 1, 0, 11)]
    kept = alone({"a": a, "b": b})
    assert kept == {"a": [a[0]], "b": [b[1]]}  # a[1] (20-30 ms) and b[0] (25-35 ms) overlap


def test_the_fit_drops_steps_another_program_slowed_and_recovers_the_cost():
    truth = StepCost((1, 16, 64), (0.008, 0.012, 0.03), 0.0004, 2e-7, 1e-6, prefill_step_s=0.004)
    shapes = [StepShape(q, 1, q * q, 0) for q in (16, 64)] + [StepShape(40, 1, 40 * 60, 0)]
    shapes += [StepShape(q, 1, q * (q + 512), 0) for q in (16, 64)]  # after context
    shapes += [StepShape(b, b, 0, b * c) for b in (1, 4, 16, 64) for c in (64, 1024)]
    records = [
        logged(
            i, truth.seconds(s), s.num_tokens, s.num_sampled, s.prefill_attention, s.decode_context
        )
        for i, s in enumerate(shapes)
    ]
    slowed = [dict(r, execute=2.5 * r["execute"]) for r in records[::3]]  # a busy neighbour
    fitted = fit_step_log(records + slowed)
    for s in shapes:
        assert fitted.seconds(s) == pytest.approx(truth.seconds(s), rel=1e-6)
    assert fitted.prefill_step_s == pytest.approx(0.004, rel=1e-6)


def test_a_replayed_host_slowdown_stretches_the_steps_in_its_window():
    # Factor 2 until 11 ms: the prefill (20 ms of work from 1 ms) does 5 ms of work by
    # 11 ms and the other 15 ms at full speed: it ends at 26 ms, the token is at the
    # router at 27 ms. The decode steps after run at full speed.
    slow = HostSlowdown((0.0, 0.011), (2.0, 1.0))
    for profile in (
        make_profile(),
        dataclasses.replace(make_profile(), hardware={"device": "cuda"}),
    ):
        record = one_request(profile, host_slowdown=slow)
        assert record.ttft_s == pytest.approx(0.027)
        assert record.itl_s == pytest.approx([0.010, 0.010])


def test_the_slowdown_per_window_is_measured_over_priced_steps_that_ran_alone():
    profile = make_profile()  # tokens(N) = 10 ms + 0.1 ms per token past the first
    a = [logged(100.0, 0.020, 1, 1, 0, 10), logged(100.5, 0.010, 1, 1, 0, 11)]
    a += [logged(104.2, 0.030, 1, 1, 0, 12)]  # window 2 (4-6 s): 3x
    b = [logged(100.505, 0.010, 1, 1, 0, 10)]  # overlaps a[1]: neither counts
    slow = from_step_logs({"a": a, "b": b}, profile, window_s=2.0)
    assert slow.times == (0.0, 2.0, 4.0, 6.0)
    assert slow.factors == pytest.approx((2.0, 1.0, 3.0, 1.0))
    assert slow.factor(5.0) == pytest.approx(3.0) and slow.factor(60.0) == 1.0


def test_a_sampled_background_load_takes_its_share_while_it_lasts():
    # One core; another program's thread runnable until 11 ms: the prefill runs at half
    # speed until then (5 of its 20 ms of work), the rest at full speed, as above.
    record = one_request(make_profile(cores=1), background_trace=[(0.0, 1.0), (0.011, 0.0)])
    assert record.ttft_s == pytest.approx(0.027)
    assert record.itl_s == pytest.approx([0.010, 0.010])


def test_contention_in_situ_splits_the_overlapped_steps_extra_into_read_and_compute():
    # tokens(N) = 10 ms + 0.1 ms per token past the first: the weights' read (tokens(1))
    # is 10 ms. With read x1.5 and compute x3: a one-row decode (10 ms, all read) takes
    # 15 ms; a 101-token prefill (20 ms: 10 read + 10 compute) takes 15 + 30 = 45 ms.
    profile = make_profile()
    a = [logged(0.0, 0.045, 101, 1, 101 * 101, 0)]
    b = [logged(t, 0.015, 1, 1, 0, 0) for t in (0.0, 0.015, 0.030)]  # each inside a[0]
    b.append(logged(2.0, 0.030, 1, 1, 0, 0))  # alone: left out
    read, compute = contention_from_logs([{"a": a, "b": b}], profile)
    assert (read, compute) == (pytest.approx(1.5), pytest.approx(3.0))
