"""Sharing a CPU machine (sim/sharing.py): the contention model and the front end's CPU,
against hand-computed stretches.

Costs (tests/sim/builders.py): a step of N tokens takes 10 ms + 0.1 ms per token past the
first, so the weights' read (`tokens(1)`) is 10 ms; every message takes 1 ms.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.bench.loadgen import Arrival
from pdserve.sim.run import simulate
from pdserve.sim.sharing import FrontEnd, speeds
from pdserve.sim.steps import Busy
from tests.sim.builders import layout, make_profile, spec


@dataclasses.dataclass
class Reader:
    threads: int = 1
    memory_s: float = 0.010


def test_speeds_stretch_the_weight_read_and_share_the_cores():
    steps = {
        "long": Busy(Reader(), None, [0.040], 0.0),  # 40 ms: 10 ms of it reads weights
        "short": Busy(Reader(), None, [0.010], 0.0),  # all of it reads weights
    }
    assert speeds(steps, cores=2, background_load=0.0, contention=2.0) == pytest.approx(
        {"long": 0.040 / 0.050, "short": 0.010 / 0.020}
    )
    alone = {"long": steps["long"]}
    assert speeds(alone, cores=2, background_load=0.0, contention=2.0) == {"long": 1.0}
    steps["frontend"] = Busy(FrontEnd(), None, [0.001], 0.0)  # 3 threads on 2 cores
    assert speeds(steps, cores=2, background_load=0.0, contention=2.0) == pytest.approx(
        {"long": 0.8 * 2 / 3, "short": 0.5 * 2 / 3, "frontend": 2 / 3}
    )


def test_compute_contention_stretches_the_rest_of_a_step():
    steps = {
        "long": Busy(Reader(), None, [0.040], 0.0),  # 10 ms read + 30 ms compute
        "short": Busy(Reader(), None, [0.010], 0.0),  # read only
    }
    got = speeds(steps, cores=2, background_load=0.0, contention=2.0, compute_contention=1.5)
    # long: 10 ms * 2 + 30 ms * 1.5 = 65 ms; short: 10 ms * 2 = 20 ms.
    assert got == pytest.approx({"long": 0.040 / 0.065, "short": 0.010 / 0.020})
    alone = {"long": steps["long"]}
    assert speeds(alone, cores=2, background_load=0.0, contention=2.0, compute_contention=1.5) == {
        "long": 1.0
    }


def test_contention_fit_recovers_both_factors():
    from pdserve.sim.measure import fit_contention

    # (read s, compute s, extra s together) for factors 1.6 (read) and 1.25 (compute)
    shapes = [(0.010, 0.0), (0.010, 0.015), (0.010, 0.140)]
    rows = [(m, c, 0.6 * m + 0.25 * c) for m, c in shapes]
    assert fit_contention(rows) == pytest.approx((1.6, 1.25))
    # Compute that got faster together (noise): clipped to 1, the read refitted alone.
    rows = [(m, c, 0.6 * m - 0.05 * c) for m, c in shapes]
    read, compute = fit_contention(rows)
    assert compute == 1.0
    assert read == pytest.approx(
        1.0 + sum(m * e for m, _, e in rows) / sum(m * m for m, *_ in rows)
    )


@pytest.mark.parametrize("decode_runs", [False, True])
def test_two_workers_stepping_together_stretch_by_the_contention_model(decode_runs):
    serve = dataclasses.replace(layout("aggregated"), mixed_workers=2, routing_policy="round_robin")
    records = simulate(
        serve,
        make_profile(cores=2, contention=1.5),
        [spec(100, 3), spec(100, 3, first="beta")],
        Arrival.poisson(float("inf")),
        num_requests=2,
        decode_runs=decode_runs,
    ).records
    for record in records:
        # Prefill of 101 tokens: 20 ms alone, 10 ms of it the weights' read, read 1.5x
        # slower beside the other worker: 25 ms. Decode steps: 10 ms, all read: 15 ms.
        assert record.ttft_s == pytest.approx(0.001 + 0.025 + 0.001)
        assert record.itl_s == pytest.approx([0.015, 0.015])


def test_the_front_end_takes_its_share_of_one_core():
    profile = dataclasses.replace(make_profile(cores=1), frontend_s_per_token=0.005)
    record = simulate(
        layout("aggregated"),
        profile,
        [spec(100, 3)],
        Arrival.poisson(float("inf")),
        num_requests=1,
        decode_runs=False,
    ).records[0]
    # Prefill 1-21 ms; its token reaches the router at 22 ms and queues 5 ms of front-end
    # CPU beside the first decode step (21 ms on): both at half speed until the front end
    # is done at 32 ms (the step has 6 of its 10 ms), the step ends at 36 ms, its token
    # arrives at 37 ms. The same again for the second decode step.
    assert record.ttft_s == pytest.approx(0.022)
    assert record.itl_s == pytest.approx([0.015, 0.015])


@pytest.mark.parametrize("decode_runs", [False, True])
def test_the_routers_cost_per_step_message_is_paid_once_per_step_not_per_row(decode_runs):
    """`frontend_s_per_step`: one `StepOutputs` message per worker step, whatever its
    batch. One request alone: the same as that cost per token. Four decoding together:
    a quarter of the front-end CPU per token, so the steps it slows are shorter."""

    def itls(num_requests: int, **costs) -> list[float]:
        profile = dataclasses.replace(make_profile(cores=1), **costs)
        records = simulate(
            layout("aggregated"),
            profile,
            [spec(100, 6)] * num_requests,
            Arrival.poisson(float("inf")),
            num_requests=num_requests,
            decode_runs=decode_runs,
        ).records
        return [itl for record in records for itl in record.itl_s]

    assert itls(1, frontend_s_per_step=0.005) == pytest.approx(itls(1, frontend_s_per_token=0.005))
    per_step = itls(4, frontend_s_per_step=0.005)
    per_token = itls(4, frontend_s_per_token=0.005)
    none = itls(4)
    assert sum(none) < sum(per_step) < sum(per_token)


def test_a_busy_worker_outside_the_simulation_contends_like_one_inside():
    """`busy_workers=1` (the SLO planner's neighbour, sim/rates.py): one worker alone is
    stretched exactly as if a second one were stepping beside it all along."""
    serve = dataclasses.replace(layout("aggregated"), mixed_workers=1)
    run = {"num_requests": 1, "decode_runs": False}
    profile = make_profile(cores=2, contention=1.5)
    alone = simulate(serve, profile, [spec(100, 3)], Arrival.poisson(float("inf")), **run)
    beside = simulate(
        serve, profile, [spec(100, 3)], Arrival.poisson(float("inf")), busy_workers=1, **run
    )
    assert alone.records[0].ttft_s == pytest.approx(0.001 + 0.020 + 0.001)
    assert alone.records[0].itl_s == pytest.approx([0.010, 0.010])
    assert beside.records[0].ttft_s == pytest.approx(0.001 + 0.025 + 0.001)
    assert beside.records[0].itl_s == pytest.approx([0.015, 0.015])
