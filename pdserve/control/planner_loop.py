"""The SLO planner's loop beside the router: every `interval_s`, forecast, rate the layouts
per workload class (`slo_classes.py`), calibrate the rates to what the cluster delivers
(`calibration.py`), decide (`planner.py`), and carry out one move through the elastic
drain-and-switch. The decisions themselves are `planner.py`'s plain functions."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable

from pdserve.control.calibration import Evidence, calibrate
from pdserve.control.planner import (
    Decision,
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
        decision = decide(
            roles, fc, rates, self.config, now, self.last_switch, self.heading, capacity
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
            self.heading = decision.target
            await self.switch(worker_id, role, "planner")
            self.last_switch = self.clock()
        return decision

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
