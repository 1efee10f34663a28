"""The SLO planner's loop beside the router: every `interval_s`, forecast, rate the layouts
per workload class (`slo_classes.py`), calibrate the rates to what the cluster delivers
(`calibration.py`), decide (`planner.py`), and carry out one move through the elastic
drain-and-switch. The decisions themselves are `planner.py`'s plain functions.

A transition that turns out clearly worse is undone without waiting for the cooldown
(`PlannerLoop._undo_target`): the layout it left delivered, in this mix, at least
1 / `UNDO_BELOW` of what the new one delivers, for `UNDO_PASSES` passes in a row and not
recovering. Measured on a degraded Intel host (docs/benchmarks.md, "Elastic P/D"): 2M,
meeting 81 % of `code` at 12 req/s, tried 1P/1M, which met the SLOs of 4.8, 4.2, then 3.6
req/s against 2M's 7.7; the 20 s cooldown held it there and the backlog it left cost the
rest of the trace. Two passes, not one, because a new layout's first requests queue
behind the backlog the old one left: a right move recovers from it between passes, a
wrong one does not."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable

from pdserve.control.calibration import Calibration, Evidence, calibrate
from pdserve.control.planner import (
    Decision,
    Forecast,
    Layout,
    PlannerConfig,
    RateModel,
    RequestLog,
    current_layout,
    decide,
    describe_layout,
    forecast,
)
from pdserve.control.slo_classes import class_rates

logger = logging.getLogger(__name__)

UNDO_BELOW = 2 / 3  # the new layout delivers under this share of what the old one did ...
UNDO_PASSES = 2  # ... for this many passes in a row, not recovering: back at once


class PlannerLoop:
    """The planner running beside the router: every `interval_s`, forecast, decide, and
    carry out one move (`switch(worker, role, reason)`, an awaitable: the elastic
    drain-and-switch). Decisions are kept (`history`) for `/admin` and the dashboard."""

    def __init__(
        self,
        config: PlannerConfig,
        log: RequestLog,
        rates: RateModel,
        roles: Callable[[], dict[str, str]],
        switch: Callable[[str, str, str], object],
        on_decision: Callable[[Decision], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.log = log
        self.rates = rates
        self.roles = roles
        self.switch = switch
        self.on_decision = on_decision
        self.clock = clock  # when a switch ended (control/replay.py runs a simulated one)
        self.last_switch: float | None = None
        self.heading: Layout | None = None  # the target of the transition under way
        self.history: deque[tuple[float, Decision]] = deque(maxlen=100)
        self.evidence = Evidence()  # what layouts delivered (control/calibration.py)
        self.traffic_since: float | None = None  # the last change of traffic the forecast saw
        # The layout the last transition left, while it may still be undone (module doc),
        # and what the new layout delivered at each failing pass since it arrived.
        self.came_from: Layout | None = None
        self.failing: list[float] = []

    async def step(self, now: float | None = None) -> Decision | None:
        now = self.clock() if now is None else now
        roles = self.roles()
        if not roles:
            return None
        fc = forecast(self.log, self.config, now)
        rates = await asyncio.get_running_loop().run_in_executor(
            None, class_rates, self.rates, fc, self.config
        )

        current = current_layout(roles)
        # Only requests admitted since the last switch and since the traffic last changed
        # are the current layout's evidence for the current mix (calibration.py).
        self.traffic_since = fc.since if fc.since is not None else self.traffic_since
        marks = (self.last_switch, self.traffic_since)
        since = max((t for t in marks if t is not None), default=None)
        rates, calibration = calibrate(rates, current, fc, self.log, self.config, now, since)
        if self.heading == current:
            self.heading = None  # arrived
        serving = current.serving(self.config.local_prefill)
        self.evidence.update(serving, fc, calibration, now)
        capacity = self.evidence.capacity(rates, serving, fc, calibration, now)
        undo, delivered_before = self._undo_target(serving, fc, calibration, now)
        # An undo is carried out like the rest of a transition under way: past the cooldown.
        heading = self.heading if self.heading is not None else undo
        decision = decide(roles, fc, rates, self.config, now, self.last_switch, heading, capacity)
        undoing = undo is not None and bool(decision.moves) and decision.target == undo
        if undoing:
            decision = dataclasses.replace(
                decision,
                reason=(
                    f"undo: {describe_layout(current)} met the SLOs of "
                    f"{calibration.delivered:.2f} req/s against the {delivered_before:.2f} "
                    f"{describe_layout(undo)} delivered, {UNDO_PASSES} passes running; back "
                    f"without waiting for the cooldown"
                ),
            )
        if calibration.saturated:
            note = (
                f" (model rates x{calibration.factor:.2f}: {describe_layout(current)} met the SLOs "
                f"of {calibration.delivered:.2f} req/s of {fc.rate:.2f})"
            )
            decision = dataclasses.replace(decision, reason=decision.reason + note)
        self.history.append((now, decision))
        if self.on_decision is not None:
            self.on_decision(decision)
        if decision.moves:
            worker_id, role = decision.moves[0]  # one at a time; the next pass re-decides
            if decision.target != self.heading:  # a new transition: it may be undone, but
                self.came_from = None if undoing else current  # a return is not undone
                self.failing = []
            self.heading = decision.target
            await self.switch(worker_id, role, "planner")
            self.last_switch = self.clock()
        return decision

    def _undo_target(
        self, serving: Layout, fc: Forecast, calibration: Calibration, now: float
    ) -> tuple[Layout | None, float]:
        """The layout the last transition left and what it delivered in this mix, when the
        one it arrived at has done clearly worse for `UNDO_PASSES` passes, not recovering
        (module doc); else (None, 0). Only within the cooldown: after it, the usual rules
        decide anyway."""
        came_from = self.came_from
        if came_from is None or self.heading is not None or self.last_switch is None:
            return None, 0.0
        if now - self.last_switch >= self.config.cooldown_s:
            self.came_from = None
            return None, 0.0
        before = came_from.serving(self.config.local_prefill)
        seen = [
            self.evidence.delivered(before, fc, now),
            self.evidence.floor(before, fc, now),
        ]
        delivered_before = max((x for x in seen if x is not None), default=None)
        worse = (
            before != serving
            and calibration.saturated
            and delivered_before is not None
            and calibration.delivered < UNDO_BELOW * delivered_before
        )
        if not worse:
            self.failing = []
        elif self.failing and calibration.delivered > self.failing[-1]:
            self.failing = [calibration.delivered]  # recovering: a new run of passes starts
        else:
            self.failing.append(calibration.delivered)
        if len(self.failing) < UNDO_PASSES:
            return None, 0.0
        return came_from, delivered_before or 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                decision = await self.step()
            except Exception:  # the planner must not die of one bad pass
                logger.exception("planner pass failed")
                continue
            if decision is not None and decision.moves:
                logger.info("planner: %s; moving %s", decision.reason, decision.moves[0])
