"""Calibrating the planner's rate model against what the cluster actually delivers.

The rate model (`sim/rates.py`) simulates the workers on a `pdserve profile` cost model
measured once. When the host is slower than when it was profiled — other tenants on the
cores, a noisy neighbour, thermal limits — every predicted capacity is too high, each
layout seems to serve the whole offered rate, `propose` caps them all at that rate, and
the planner holds the current layout even while it misses its SLOs (measured: on a
shared 2-core host running ~8x slower than its profile, the planner never moved).

The correction needs no model of the slowdown: when the current layout is missing its
SLOs — the requests that finished within their class's SLO over the last
`mix_window_s` come to less than `target` x the forecast arrival rate, and less than
`target` of the requests that finished — the current layout is saturated, so its real
capacity is what it delivered. All role rates are
scaled by `k = delivered / predicted capacity of the current layout` (k <= 1), which
keeps the model's *relative* judgement of the layouts (what the simulator is good at)
and replaces its absolute level (what it cannot know). While the SLOs are met, nothing
is scaled: there is no evidence of saturation, and capacities above the rate are capped
by the rate anyway.

Scaling keeps the model's relative judgement, and that can be wrong too: on a quiet
2-core host the model rated 1P + 1D above 2 mixed workers for `code` under a 150 ms TTFT
(9.5 vs 7.8 req/s) while 2M met 98 % at 10 req/s and 1P + 1D 83 %; scaled, 2M stayed
below what 1P + 1D delivered and the planner held 1P + 1D for the whole phase
(docs/benchmarks.md, "Elastic P/D", the quiet-host run). So the planner also remembers
what each layout *did* (`Evidence`, per mix): a layout seen saturated is rated at what it
delivered (never below its floor, the most it delivered while meeting its SLOs), the
current layout while it meets its SLOs at no less than what it delivers, and while the
current layout meets under `EXPLORE_BELOW` of its SLOs a layout never tried is given the
benefit of the doubt (`EXPLORE` x its rate): it is tried once, and if it does worse, its
own evidence sends the cluster back and keeps it there. Evidence lasts `EVIDENCE_TTL_S`
(the host's load drifts) and belongs to one mix (the classes and `Forecast.signature`).

Outcomes come from the serving layer (`RequestLog.record_outcome`: TTFT and TPOT of each
finished prompt, with its class and admission time); a failed request is a miss. Only
requests admitted after the last switch count: the backlog a previous layout left is
not the current layout's doing (measured: right after 2 mixed -> 1P + 1D, the new layout
"met the SLOs of 0.00 req/s" while it worked off the old one's queue, and the planner
switched back, docs/benchmarks.md "Elastic P/D"). And what was delivered is counted over
the time there was traffic to deliver — since the first admission or the last switch,
at most `mix_window_s` — not over a window reaching back before it (measured: 7 s into a
run, 2 mixed workers that would meet 98 % of `code` "met the SLOs of 0.85 req/s of
2.50": 17 requests over a 20 s window that had held traffic for 7 s, and the planner
switched to 1P + 1D, which then missed more).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.control.planner import (
    MIN_MIX,
    Capacity,
    Forecast,
    Layout,
    PlannerConfig,
    RequestLog,
    RoleRates,
)

TARGET = 0.9  # the share of the offered rate that must meet its SLO (DistServe's 90 %)
FLOOR_MET = 0.5  # requests counted as met when none was: k stays > 0, layouts comparable
# An untried layout's scaled rate is multiplied by this while the current one is
# saturated: the model's relative merits were off by 1.2x on the quiet host (module doc),
# so a layout it rates within 1.5 / 1.1 (hysteresis) of the current one gets one try.
EXPLORE = 1.5
EXPLORE_BELOW = 0.8  # ... and only when the current layout meets under 80 % of its SLOs
EVIDENCE_TTL_S = 600.0


@dataclass(frozen=True, slots=True)
class Calibration:
    factor: float  # k: every role rate is multiplied by it (1.0: unchanged)
    delivered: float  # requests/s that met their SLO over the window
    num_outcomes: int
    saturated: bool = False  # the current layout missed its SLOs (module doc)
    met_share: float = 1.0  # of the window's finished requests, the share that met them


def is_met(outcome, config: PlannerConfig) -> bool:
    slo = config.for_class(config.class_of(outcome.slo_class))
    if outcome.ttft_s is None or outcome.ttft_s * 1e3 > slo.slo_ttft_ms:
        return False
    return outcome.tpot_s is None or outcome.tpot_s * 1e3 <= slo.slo_tpot_ms


def calibrate(
    rates: RoleRates,
    current: Layout,
    fc: Forecast,
    log: RequestLog,
    config: PlannerConfig,
    now: float,
    since: float | None = None,
) -> tuple[RoleRates, Calibration]:
    """`rates` scaled to what the current layout delivers when it misses its SLOs;
    `since` (the last switch): only requests admitted after it are the current layout's."""
    window = [
        o
        for o in log.outcomes
        if now - config.window_s < o.time <= now
        and (since is None or o.arrival is None or o.arrival >= since)
    ]
    recent = [o for o in window if o.time > now - config.mix_window_s]
    evidence_from = max(t for t in (log.started, since, now - config.mix_window_s) if t is not None)
    span = max(now - evidence_from, config.interval_s)
    if len(recent) < MIN_MIX:  # a slow trickle: the latest MIN_MIX, over the time they took
        recent = window[-MIN_MIX:]
        if len(recent) < MIN_MIX:
            return rates, Calibration(1.0, 0.0, len(recent))
        span = max(now - recent[0].time, config.interval_s)
    num_met = sum(is_met(o, config) for o in recent)
    delivered = num_met / span
    capacity = current.capacity(rates)
    # Saturated: it delivers less than the forecast AND misses the SLO of its finished
    # requests. The rates alone are two noisy estimates (a 20 s window holds ~16 long
    # prompts at 0.8 req/s): an elastic run whose every request met its SLO was scaled to
    # x0.39-0.73 in 13 of 60 passes, which turns a tie into a switch on noise.
    share = num_met / len(recent)
    if delivered >= TARGET * fc.rate or share >= TARGET:
        return rates, Calibration(1.0, delivered, len(recent), met_share=share)
    if capacity <= 0:  # the model gives it nothing: no level to scale from
        return rates, Calibration(1.0, delivered, len(recent), True, share)
    # k > 1 is reported but scales nothing: that the model underrates the current layout
    # does not say it underrates the others (measured: x2.25 on 2M made 1P/1M look better
    # and the cluster left 2M, which met 88 %, for 1P/1M, which met 40 %). It is the level
    # an untried layout is judged at when one is tried (`Evidence.capacity`).
    factor = max(num_met, FLOOR_MET) / span / capacity
    scaled = rates.scaled(factor) if factor < 1 else rates
    return scaled, Calibration(factor, delivered, len(recent), True, share)


MixKey = tuple[tuple[str, ...], tuple[int, int]]


def mix_key(fc: Forecast) -> MixKey:
    """The mix evidence belongs to: its classes and coarse lengths."""
    return tuple(sorted(set(fc.classes))), fc.signature


class Evidence:
    """What each (serving) layout delivered per mix (module doc): when it was saturated
    (its capacity, as far as anyone knows), and the most it delivered while it met its
    SLOs (a floor: a burst that saturates it for a window does not make it worse than a
    layout that did badly before — measured: 1P/1M, having met 1.1 req/s of long prompts
    for two minutes, "met 0.15 req/s" in a burst and the planner moved back to 2M, which
    had delivered 0.30)."""

    def __init__(self, ttl_s: float = EVIDENCE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._saturated: dict[tuple[Layout, MixKey], tuple[float, float]] = {}
        self._floor: dict[tuple[Layout, MixKey], tuple[float, float]] = {}

    def update(self, serving: Layout, fc: Forecast, cal: Calibration, now: float) -> None:
        """Remember a saturated layout's goodput, or raise its floor while it meets its
        SLOs (and forget a saturated reading it has since beaten)."""
        for table in (self._saturated, self._floor):  # a router runs for weeks: stay bounded
            for stale in [k for k, (_, t) in table.items() if now - t > self.ttl_s]:
                del table[stale]
        key = (serving, mix_key(fc))
        if cal.saturated:
            self._saturated[key] = (cal.delivered, now)
            return
        if cal.num_outcomes < MIN_MIX or cal.met_share < TARGET:
            return  # a floor needs the SLOs met, not only a forecast rate that dipped
        if cal.delivered >= (self._fresh(self._floor, key, now) or 0.0):
            self._floor[key] = (cal.delivered, now)
        if cal.delivered > self._saturated.get(key, (float("inf"), now))[0]:
            del self._saturated[key]

    def delivered(self, serving: Layout, fc: Forecast, now: float) -> float | None:
        """What `serving` delivered when last seen saturated in this mix, if lately."""
        return self._fresh(self._saturated, (serving, mix_key(fc)), now)

    def floor(self, serving: Layout, fc: Forecast, now: float) -> float | None:
        """The most `serving` delivered lately in this mix while meeting its SLOs."""
        return self._fresh(self._floor, (serving, mix_key(fc)), now)

    def _fresh(self, table, key, now: float) -> float | None:
        seen = table.get(key)
        return seen[0] if seen is not None and now - seen[1] <= self.ttl_s else None

    def capacity(
        self, rates: RoleRates, current: Layout, fc: Forecast, cal: Calibration, now: float
    ) -> Capacity:
        """The planner's `capacity` (planner.propose): `rates` (already scaled by `cal`)
        corrected by what was seen. `current`: the serving layout now. An untried layout
        gets `EXPLORE` x its rate (at the level the current one shows, k, when the model
        underrates it) only when the current one meets under `EXPLORE_BELOW` of its
        finished requests' SLOs: a move the model does not back needs more than the 90 %
        line."""
        exploring = cal.saturated and cal.met_share < EXPLORE_BELOW
        explore = EXPLORE * max(cal.factor, 1.0) if exploring else 1.0

        def judge(serving: Layout) -> float:
            model = serving.capacity(rates)
            floor = self.floor(serving, fc, now) or 0.0
            if serving == current:
                return max(cal.delivered, floor) if cal.saturated else max(model, cal.delivered)
            seen = self.delivered(serving, fc, now)
            if seen is not None:
                return max(seen, floor)
            return max(model * explore, floor)

        return judge
