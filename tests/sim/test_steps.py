"""Work in progress under processor sharing (`Busy`), and decode runs: simulating the
steps the scheduler foresees as one run gives the clock stepping one by one gives."""

from __future__ import annotations

import pytest

from pdserve.bench.loadgen import Arrival
from pdserve.sim.run import simulate
from pdserve.sim.steps import Busy
from tests.sim.builders import layout, make_profile, spec


def test_a_run_slowed_halfway_ends_its_steps_at_hand_computed_times():
    busy = Busy(worker=None, work=None, works=[0.01, 0.02, 0.03], started=1.0)
    busy.set_speed(1.0, 1.0)
    assert busy.end_time() == pytest.approx(1.06)
    busy.set_speed(1.02, 0.5)  # 0.02 of work done: the second step is half done
    assert busy.end_time() == pytest.approx(1.02 + 0.04 / 0.5)
    assert busy.step_ends(1.10) == pytest.approx([1.01, 1.04, 1.10])


def test_a_message_cuts_a_run_after_the_step_in_progress():
    busy = Busy(worker=None, work=None, works=[0.01, 0.01, 0.01, 0.01], started=0.0)
    busy.set_speed(0.0, 1.0)
    version = busy.version
    assert busy.cut(0.015)  # in the second step
    assert busy.works == [0.01, 0.01] and busy.version == version + 1
    assert busy.end_time() == pytest.approx(0.02)
    assert not busy.cut(0.018)  # already ends with the step in progress
    single = Busy(worker=None, work=None, works=[0.05], started=0.0)
    single.set_speed(0.0, 1.0)
    assert not single.cut(0.01)


@pytest.mark.parametrize("mode", ["aggregated", "disaggregated", "auto"])
@pytest.mark.parametrize("cores", [1, 2])
def test_decode_runs_give_the_clock_of_single_steps(mode, cores):
    specs = [spec(20 + 37 * i, 5 + 11 * i, first=f"w{i}") for i in range(8)]
    profile = make_profile(cores=cores)

    def records(runs: bool):
        return simulate(
            layout(mode, num_blocks=60),
            profile,
            specs,
            Arrival.poisson(25.0),
            num_requests=len(specs),
            seed=3,
            decode_runs=runs,
        ).records

    stepped, run = records(False), records(True)
    for a, b in zip(stepped, run, strict=True):
        assert b.num_output_tokens == a.num_output_tokens == len(b.itl_s) + 1
        assert b.ttft_s == pytest.approx(a.ttft_s, abs=1e-9)
        assert b.itl_s == pytest.approx(a.itl_s, abs=1e-9)
        assert b.e2e_s == pytest.approx(a.e2e_s, abs=1e-9)
