"""Contention by step size (`Profile.contention_curve`, sim/sharing.py) and the decode
worker's own CPU per received hand-over (`Profile.receive_s_per_*`, sim/receive.py),
against hand-computed times.

Costs (tests/sim/builders.py): a step of N tokens takes 10 ms + 0.1 ms per token past the
first; every message takes 1 ms; blocks hold 16 tokens.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.bench.loadgen import Arrival
from pdserve.sim.measure import fit_contention_curve
from pdserve.sim.profile import Profile
from pdserve.sim.receive import fit_line, measure_receive
from pdserve.sim.run import simulate
from pdserve.sim.sharing import curve_slowdown, speeds
from pdserve.sim.steps import Busy
from tests.sim.builders import layout, make_profile, spec

CURVE = ((1, 1.5), (101, 2.0))


@dataclasses.dataclass
class Reader:
    threads: int = 1
    memory_s: float = 0.010


def test_curve_slowdown_is_linear_between_knots_and_flat_outside():
    assert curve_slowdown(CURVE, 0) == 1.5
    assert curve_slowdown(CURVE, 1) == 1.5
    assert curve_slowdown(CURVE, 51) == 1.75
    assert curve_slowdown(CURVE, 101) == 2.0
    assert curve_slowdown(CURVE, 5000) == 2.0


def test_speeds_follow_the_curve_at_the_largest_steps_tokens():
    steps = {
        "prefill": Busy(Reader(), None, [0.020], 0.0, tokens=101),
        "decode": Busy(Reader(), None, [0.010], 0.0, tokens=1),
    }
    # The curve replaces both factors (contention 3.0 would give other speeds); the
    # larger step (101 tokens) sets the slowdown of both.
    got = speeds(steps, cores=2, background_load=0.0, contention=3.0, curve=CURVE)
    assert got == {"prefill": 1 / 2.0, "decode": 1 / 2.0}
    decodes = {"a": steps["decode"], "b": Busy(Reader(), None, [0.010], 0.0, tokens=51)}
    got = speeds(decodes, cores=2, background_load=0.0, contention=3.0, curve=CURVE)
    assert got == {"a": 1 / 1.75, "b": 1 / 1.75}
    alone = {"prefill": steps["prefill"]}
    assert speeds(alone, cores=2, background_load=0.0, contention=3.0, curve=CURVE) == {
        "prefill": 1.0
    }


def test_the_curve_is_each_shapes_median_slowdown_over_every_run():
    alone = [
        {"kind": "prefill", "num_decodes": 0, "prefill_tokens": 256, "seconds": 0.1},
        {"kind": "decode", "num_decodes": 1, "prefill_tokens": 0, "seconds": 0.01},
    ]
    runs = [
        {"alone": alone, "slowdowns": [1.8, 1.2, 1.9, 0.9]},  # two children: 2 x 2 shapes
        {"alone": alone, "slowdowns": [1.7, 1.1]},
        None,  # a --quick profile: no contention runs
    ]
    # prefill: median(1.8, 1.9, 1.7) = 1.8; decode: median(1.2, 0.9, 1.1) = 1.1
    assert fit_contention_curve(runs) == ((1, 1.1), (256, 1.8))
    faster = [{"alone": alone[1:], "slowdowns": [0.9]}]  # faster together: noise, 1.0
    assert fit_contention_curve(faster) == ((1, 1.0),)
    assert fit_contention_curve([None]) == ()


def test_two_workers_stepping_together_stretch_by_the_curve():
    serve = dataclasses.replace(layout("aggregated"), mixed_workers=2, routing_policy="round_robin")
    profile = dataclasses.replace(make_profile(cores=2, contention=9.0), contention_curve=CURVE)
    records = simulate(
        serve,
        profile,
        [spec(100, 3), spec(100, 3, first="beta")],
        Arrival.poisson(float("inf")),
        num_requests=2,
    ).records
    for record in records:
        # Prefill of 101 tokens: 20 ms alone, x2.0 beside the other: 40 ms. One-row
        # decodes: 10 ms, x1.5: 15 ms.
        assert record.ttft_s == pytest.approx(0.001 + 0.040 + 0.001)
        assert record.itl_s == pytest.approx([0.015, 0.015])


def test_the_decode_worker_pays_for_a_received_hand_over():
    profile = dataclasses.replace(
        make_profile(), receive_s_per_request=0.002, receive_s_per_block=0.0005
    )
    serve = layout("disaggregated", kv_layerwise=False)
    record = simulate(
        serve, profile, [spec(100, 5)], Arrival.poisson(float("inf")), num_requests=1
    ).records[0]
    assert record.ttft_s == pytest.approx(0.024)  # the prefill side is unchanged
    # As without the cost (tests/sim/test_cluster.py: KVDone at 29 ms, first decode step
    # 10 ms), plus 2 ms + 7 blocks (101 tokens) x 0.5 ms = 5.5 ms on that first step.
    assert record.itl_s == pytest.approx([0.016 + 0.0055, 0.010, 0.010, 0.010], abs=1e-9)


def test_profile_files_keep_the_curve_and_the_receive_cost(tmp_path):
    profile = dataclasses.replace(
        make_profile(),
        contention_curve=CURVE,
        receive_s_per_request=1e-5,
        receive_s_per_block=3e-6,
    )
    profile.save(tmp_path / "p.json")
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded.contention_curve == CURVE
    assert (loaded.receive_s_per_request, loaded.receive_s_per_block) == (1e-5, 3e-6)


def test_fit_line_and_the_quick_receive_timing():
    assert fit_line([(1.0, 0.003), (3.0, 0.007)]) == pytest.approx((0.001, 0.002))
    assert fit_line([(2.0, 0.004)]) == (0.004, 0.0)
    per_request, per_block, details = measure_receive(quick=True)
    assert [x for x, _ in details["blocks_seconds"]] == [1.0, 32.0]
    assert per_request >= 0.0 and per_block >= 0.0
    assert all(seconds > 0 for _, seconds in details["blocks_seconds"])


def test_merge_pools_the_curve_and_keeps_the_smallest_measured_receive_cost():
    from pdserve.sim.measure import merge_fastest

    alone = [{"kind": "decode", "num_decodes": 1, "prefill_tokens": 0, "seconds": 0.01}]

    def measured(slowdowns: list[float], per_request: float) -> Profile:
        checks = {"runs": {}, "contention": {"alone": alone, "slowdowns": slowdowns}}
        return dataclasses.replace(
            make_profile(),
            checks=checks,
            receive_s_per_request=per_request,
            receive_s_per_block=per_request / 4,
        )

    old = dataclasses.replace(measured([1.9], 0.0), checks={"runs": {}})  # measured neither
    merged = merge_fastest([measured([1.2, 1.4], 8e-6), measured([1.3], 6e-6), old])
    assert merged.contention_curve == ((1, 1.3),)  # median of 1.2, 1.4, 1.3
    assert (merged.receive_s_per_request, merged.receive_s_per_block) == (6e-6, 1.5e-6)
