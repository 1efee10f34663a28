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

from pdserve.control.planner import MIN_MIX, Forecast, Layout, PlannerConfig, RequestLog, RoleRates

TARGET = 0.9  # the share of the offered rate that must meet its SLO (DistServe's 90 %)
FLOOR_MET = 0.5  # requests counted as met when none was: k stays > 0, layouts comparable


@dataclass(frozen=True, slots=True)
class Calibration:
    factor: float  # k: every role rate is multiplied by it (1.0: unchanged)
    delivered: float  # requests/s that met their SLO over the window
    num_outcomes: int


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
    if delivered >= TARGET * fc.rate or num_met >= TARGET * len(recent) or capacity <= 0:
        return rates, Calibration(1.0, delivered, len(recent))
    factor = min(1.0, max(num_met, FLOOR_MET) / span / capacity)
    return rates.scaled(factor), Calibration(factor, delivered, len(recent))
