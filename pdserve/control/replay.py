"""The SLO planner offline: its decisions over a trace, on a simulated clock, no cluster.

`replay` feeds a trace's arrivals to the planner's `RequestLog` the way the router admits
them, runs `PlannerLoop.step` every `interval_s`, and makes each move take `switch_s` of
simulated time (the drain and re-registration a real switch costs), so a test or a design
script sees which layout the planner would hold in each phase of a phase-shifting trace,
when it moves and why — with the same code the router runs, and any `RateModel` (the
simulator's `SimRates` on a profile, or a table of measured rates).

Outcomes are optional: `outcome(arrival, layout)` says how a request admitted while
`layout` served (e.g. "2M", "1P/1D" — the layout it serves as, `Layout.serving`) fared:
(ttft_s, tpot_s, seconds until it finished), fed to the log when it finishes, so that
calibration (control/calibration.py) sees a host slower than the profile as it would
live; a table of what each layout measured on the real host makes a replay of the
planner's whole judgement. Without it, calibration never scales the rates and the
replay shows the rate model's own view. `phase_layouts` says how much of each phase each
layout held.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.control.planner import (
    Arrival,
    Decision,
    PlannerConfig,
    RateModel,
    RequestLog,
    current_layout,
    describe_layout,
)
from pdserve.control.planner_loop import PlannerLoop

Outcome = Callable[[Arrival, str], tuple[float | None, float | None, float]]


@dataclass(frozen=True, slots=True)
class Step:
    time: float  # when the pass ran (s from the first arrival)
    layout: str  # the layout before the pass, e.g. "2M" or "1P/1D"
    decision: Decision


@dataclass
class _Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def replay(
    arrivals: Sequence[Arrival],
    config: PlannerConfig,
    rates: RateModel,
    roles: dict[str, str],
    *,
    until_s: float,
    switch_s: float = 5.0,
    outcome: Outcome | None = None,
) -> tuple[list[Step], list[tuple[float, str]]]:
    """The planner's passes over `arrivals` from `roles`: every pass, and the layout
    timeline [(time, layout)] starting at 0 with `roles`' layout."""
    clock = _Clock()
    roles = dict(roles)
    log = RequestLog(keep_s=max(600.0, config.window_s * 2))
    timeline = [(0.0, describe_layout(current_layout(roles)))]

    async def switch(worker: str, role: str, reason: str) -> None:
        clock.now += switch_s  # the drain and the switch; arrivals keep coming meanwhile
        feed(clock.now)
        roles[worker] = role
        timeline.append((clock.now, describe_layout(current_layout(roles))))

    loop = PlannerLoop(config, log, rates, lambda: dict(roles), switch, clock=clock)
    pending = iter(sorted(arrivals, key=lambda a: a.time))
    upcoming = [next(pending, None)]

    finishing: list[tuple[float, int, float, str | None, float | None, float | None]] = []
    order = itertools.count()  # ties in finishing time: admission order

    def feed(now: float) -> None:
        while upcoming[0] is not None and upcoming[0].time <= now:
            a = upcoming[0]
            log.record(a.prompt_tokens, a.output_tokens, now=a.time, slo_class=a.slo_class)
            if outcome is not None:
                serving = current_layout(roles).serving(config.local_prefill)
                ttft, tpot, took = outcome(a, describe_layout(serving))
                entry = (a.time + took, next(order), a.time, a.slo_class, ttft, tpot)
                heapq.heappush(finishing, entry)
            upcoming[0] = next(pending, None)
        while finishing and finishing[0][0] <= now:
            done, _, admitted, slo_class, ttft, tpot = heapq.heappop(finishing)
            log.record_outcome(ttft, tpot, slo_class, now=done, arrival=admitted)

    async def run() -> list[Step]:
        steps = []
        next_pass = config.interval_s
        while next_pass <= until_s:
            clock.now = max(clock.now, next_pass)
            feed(clock.now)
            layout = describe_layout(current_layout(roles))
            started = clock.now
            decision = await loop.step(now=started)
            if decision is not None:
                steps.append(Step(started, layout, decision))
            next_pass = max(next_pass + config.interval_s, clock.now + config.interval_s)
        return steps

    return asyncio.run(run()), timeline


def phase_layouts(
    timeline: Sequence[tuple[float, str]], bounds: Sequence[tuple[float, float]]
) -> list[dict[str, float]]:
    """For each phase [start, end): the share of its time each layout held."""
    shares = []
    for start, end in bounds:
        held: dict[str, float] = {}
        for i, (since, layout) in enumerate(timeline):
            until = timeline[i + 1][0] if i + 1 < len(timeline) else float("inf")
            overlap = min(until, end) - max(since, start)
            if overlap > 0:
                held[layout] = held.get(layout, 0.0) + overlap / (end - start)
        shares.append(held)
    return shares
