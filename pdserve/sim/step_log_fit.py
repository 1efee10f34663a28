"""Step costs and loop overhead from a real run's step log: calibrating the cost model on
the serving engine itself.

`pdserve profile` times `ModelRunner.execute` on synthetic batches. A real run logged
with `PDSERVE_STEP_LOG` (engine/step_log.py) has thousands of steps of the shapes the
workload really produces, timed on the code path serving really takes, and two things
the profile does not see:

- **Loop overhead** (`StepCost.step_overhead_s`): the rest of a worker's loop pass
  around each step — `Scheduler.schedule`, the update after the step, sending outputs
  and KV events, reading messages. For two consecutive steps, `schedule` + `update` of
  the first plus the gap to the next one's start; gaps longer than `IDLE_GAP_S` are the
  worker waiting for work and are left out. The median is what a typical step pays
  (~0.35 ms on the Zen 4 host of docs/benchmarks.md: 5 % of a one-row decode).
- **Step costs** (`fit_step_log`): the cost model fitted to the logged steps, on fixed
  knots. A shared host only ever adds time to a step, so the fit is trimmed as
  `pdserve profile` takes the fastest of its repeats: fit, drop the steps more than
  `TRIM` slower than the fit, refit. Steps that overlapped a step of another worker of
  the same run (`alone`) are left out too: the simulator adds that contention itself
  (sim/sharing.py), so a cost fitted on them would count it twice.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import statistics
from collections.abc import Iterable, Mapping, Sequence

from pdserve.sim.cost_model import StepCost, StepShape, TimedStep, fit_step_cost
from pdserve.sim.profile import Profile

IDLE_GAP_S = 0.05
TRIM = 0.10  # a step more than 10 % slower than the fit was slowed by something else
GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def overheads(records: Sequence[dict]) -> list[float]:
    """Seconds of each loop pass between two consecutive busy steps of one worker."""
    out = []
    for a, b in itertools.pairwise(records):
        gap = b["t"] - (a["t"] + a["schedule"] + a["execute"] + a["update"])
        if 0.0 <= gap < IDLE_GAP_S:
            out.append(a["schedule"] + a["update"] + gap)
    return out


def loop_overhead_s(logs: Iterable[Sequence[dict]]) -> float:
    """The median loop overhead over every worker's log (each a list of step records)."""
    values = [v for records in logs for v in overheads(records)]
    if not values:
        raise ValueError("no two consecutive busy steps in the step logs")
    return statistics.median(values)


def with_step_overhead(profile: Profile, seconds: float) -> Profile:
    """`profile` with every worker size's `step_overhead_s` set to `seconds`."""
    costs = {
        size: dataclasses.replace(cost, step_overhead_s=seconds)
        for size, cost in profile.costs.items()
    }
    return dataclasses.replace(profile, costs=costs)


def alone(logs: Mapping[str, Sequence[dict]]) -> dict[str, list[dict]]:
    """Each worker's steps that overlapped no step of another worker of the same run."""
    fractions = _overlaps(logs)
    return {
        name: [r for r, f in zip(records, fractions[name], strict=True) if f == 0.0]
        for name, records in logs.items()
    }


def overlapped(logs: Mapping[str, Sequence[dict]], at_least: float = 0.9) -> list[dict]:
    """Every step that other workers' steps overlapped for `at_least` of its time."""
    fractions = _overlaps(logs)
    return [
        r
        for name, records in logs.items()
        for r, f in zip(records, fractions[name], strict=True)
        if f >= at_least
    ]


def _overlaps(logs: Mapping[str, Sequence[dict]]) -> dict[str, list[float]]:
    """Per worker, the fraction of each step's execute time during which another worker
    of the run was executing a step too."""
    spans = {
        name: [(r["t"] + r["schedule"], r["t"] + r["schedule"] + r["execute"]) for r in records]
        for name, records in logs.items()
    }
    out = {}
    for name in logs:
        others = sorted(s for other, items in spans.items() if other != name for s in items)
        starts = [s for s, _ in others]
        fractions = []
        for start, end in spans[name]:
            i = bisect.bisect_left(starts, end)  # spans starting before our end
            covered = sum(
                max(0.0, min(end, e) - max(start, s)) for s, e in others[max(0, i - 64) : i]
            )
            fractions.append(min(1.0, covered / (end - start)) if end > start else 0.0)
        out[name] = fractions
    return out


def contention_from_logs(
    logs: Iterable[Mapping[str, Sequence[dict]]], profile: Profile
) -> tuple[float, float]:
    """`Profile.contention` and `compute_contention` as the serving workers met them:
    every step another worker overlapped (>= 90 % of its time) against its price alone,
    split into weight read and compute as `pdserve profile`'s contention runs are
    (`measure.fit_contention`). In situ, so the front end and the message traffic of a
    real run are in it; a calm run is needed (other programs' bursts would count too)."""
    from pdserve.sim.measure import fit_contention

    rows = []
    for run in logs:
        for r in overlapped(run):
            cost = profile.cost(r["threads"])
            t = cost.seconds(shape(r)) - cost.step_overhead_s
            m = min(t, cost.tokens_seconds(1))
            rows.append((m, t - m, r["execute"] - t))
    if not rows:
        raise ValueError("no overlapped steps in the step logs")
    return fit_contention(rows)


def shape(record: dict) -> StepShape:
    return StepShape(
        record["tokens"], record["sampled"], record["prefill_attention"], record["decode_context"]
    )


def _knots(sizes: Sequence[int]) -> list[int]:
    """`GRID` points with a logged step between their neighbours (a knot nothing pins
    would be a free parameter), and the smallest and largest size."""
    low, high = min(sizes), max(sizes)
    grid = sorted({k for k in GRID if low < k < high} | {low, high})
    present = sorted(set(sizes))
    knots = []
    for i, k in enumerate(grid):
        before = grid[i - 1] if i else k - 1
        after = grid[i + 1] if i + 1 < len(grid) else k + 1
        j = bisect.bisect_right(present, before)
        if j < len(present) and present[j] < after:
            knots.append(k)
    return knots


def fit_step_log(records: Sequence[dict], rounds: int = 4, trim: float = TRIM) -> StepCost:
    """The cost model fitted to logged steps (execute seconds), trimmed (module docstring)."""
    sizes = [r["tokens"] for r in records]
    if not sizes:
        raise ValueError("no steps to fit")
    knots = _knots(sizes)
    samples = [TimedStep(shape(r), r["execute"]) for r in records]
    kept = samples
    cost = fit_step_cost(kept, knots=knots)
    for _ in range(rounds):
        kept = [s for s in samples if s.seconds <= (1 + trim) * cost.seconds(s.shape)]
        cost = fit_step_cost(kept, knots=knots)
    return cost
