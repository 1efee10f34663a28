"""A real run's host slowdown over time, measured from its step log and replayed in the
simulator: validation net of what other programs did to the machine.

On a shared host a real run's steps are slowed by programs outside the run, in bursts
(docs/benchmarks.md: windows of 2-5x on the Zen 4 host while other agents' nice-0 jobs
ran, beside calm windows within 5-15 % of the profile). The model cannot know those
bursts; comparing it with such a run mixes the model's error with the host's. A step log
(`PDSERVE_STEP_LOG`, engine/step_log.py) measures them: per window of the run, the
logged steps' execute seconds over what the cost model prices for the same shapes.
`simulate(..., host_slowdown=...)` then runs every worker's steps that many times slower
in that window (sim/cluster.py). What is left between the replayed simulation and the
real run is the rest of the model — queueing, chunking, batching, routing, the front
end — plus the cost model's residual error per step class, which the window ratio folds
in (so a replayed comparison is a diagnostic, not the validation itself).

Only steps that overlapped no other worker's step are used (`step_log_fit.alone`): the
simulator adds contention between workers itself. Windows with no such step replay 1.0.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pdserve.sim.profile import Profile
from pdserve.sim.step_log_fit import alone, shape


@dataclass(frozen=True)
class HostSlowdown:
    """Piecewise constant: a step in [times[i], times[i + 1]) takes factors[i] times its
    modelled seconds (the last factor holds on)."""

    times: tuple[float, ...]
    factors: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.times) != len(self.factors) or not self.times:
            raise ValueError("times and factors must be non-empty and equally long")
        if list(self.times) != sorted(set(self.times)):
            raise ValueError("times must be strictly increasing")
        if min(self.factors) <= 0:
            raise ValueError("factors must be positive")

    def factor(self, t: float) -> float:
        i = bisect.bisect_right(self.times, t) - 1
        return self.factors[max(0, i)]


def from_step_logs(
    logs: Mapping[str, Sequence[dict]], profile: Profile, window_s: float = 2.0
) -> HostSlowdown:
    """The slowdown per window of one real run's workers (module docstring); time 0 is
    the first logged step's start (the first request reached an idle server then)."""
    starts = [records[0]["t"] for records in logs.values() if records]
    if not starts:
        raise ValueError("no steps in the step logs")
    t0 = min(starts)
    measured: dict[int, float] = {}
    priced: dict[int, float] = {}
    for records in alone(logs).values():
        for r in records:
            i = int((r["t"] - t0) // window_s)
            measured[i] = measured.get(i, 0.0) + r["execute"]
            priced[i] = priced.get(i, 0.0) + profile.cost(r["threads"]).seconds(shape(r))
    last = max(measured, default=0)
    times, factors = [], []
    for i in range(last + 2):
        ratio = measured[i] / priced[i] if priced.get(i) else 1.0
        times.append(i * window_s)
        factors.append(ratio if i <= last else 1.0)
    return HostSlowdown(tuple(times), tuple(factors))
