"""The planner offline on the elastic trace (benchmarks/phases/elastic-contrast.yaml),
with control/replay.py: the layout it holds in each phase, from either start, when the
host delivers what the probes measured there. The rates are what `SimRates` measured for
the two classes on benchmarks/profiles/zen4-full.json (the quiet host's profile); the
outcomes are the probes' attainment on the shared host, so calibration must do its part."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.bench import phases
from pdserve.control.planner import Arrival, PlannerConfig, RoleRates
from pdserve.control.replay import phase_layouts, replay
from pdserve.control.slo_classes import parse_classes
from pdserve.sim.search import prompt_tokens

TRACE = Path(__file__).resolve().parents[2] / "benchmarks/phases/elastic-contrast.yaml"
# SimRates on zen4-full.json, 1 thread, 512-token chunks, 0.5 GiB KV (rounded): alone and
# beside a busy neighbour, per role (prefill, decode, mixed).
RATES = {
    "code": RoleRates(26.1, 29.9, 13.4, 9.78, 14.2, 6.29),  # 2M 12.6 vs 1P/1D 11.0
    "long": RoleRates(1.76, 3.52, 0.703, 1.05, 1.88, 0.352),  # 1P/1D 1.23 vs 2M 0.70
}
# Share of requests meeting their SLO, per class and the layout that served them (the
# probes and run B, docs/benchmarks.md "Elastic P/D"); by the layout a request was served
# by (`Layout.serving`: 1P/1M serves as 1P/1D, 2D and 1D/1M as 2M).
MET = {("code", "2M"): 0.99, ("code", "1P/1D"): 0.32, ("long", "2M"): 0.6, ("long", "1P/1D"): 0.91}
TOOK_S = {"code": 1.0, "long": 8.0}
MM = {"w0": "mixed", "w1": "mixed"}
PD = {"w0": "prefill", "w1": "decode"}


def trace(path: Path = TRACE):
    steps, seed = phases.load_phases(path)
    load = phases.build_load(steps, seed or 0)
    arrivals = [
        Arrival(s.timestamp_s, prompt_tokens(s), s.max_tokens, s.extra_body["slo_class"])
        for s in load.specs
    ]
    bounds = [
        (start, start + p.duration_s) for start, p in zip(load.starts, load.phases, strict=True)
    ]
    slos = {p.extra_body["slo_class"]: s for p, s in zip(load.phases, load.slos, strict=True)}
    return arrivals, bounds, slos


def outcomes(slos, met_share=MET):
    """Every request of a (class, layout) meets its SLO or not so that the met share is
    exactly `met_share`'s (a Bresenham count: deterministic, no sampling)."""
    counts: dict[tuple[str, str], list[int]] = {}

    def outcome(arrival, layout):
        key = (arrival.slo_class, layout)
        seen = counts.setdefault(key, [0, 0])
        seen[0] += 1
        met = int(seen[0] * met_share[key]) > seen[1]
        seen[1] += met
        slo = slos[arrival.slo_class]
        factor = 0.5 if met else 2.0
        ttft, tpot = slo.ttft_ms * factor / 1e3, slo.tpot_ms * factor / 1e3
        return ttft, tpot, TOOK_S[arrival.slo_class]

    return outcome


def config(slos):
    classes = {name: {"ttft_ms": s.ttft_ms, "tpot_ms": s.tpot_ms} for name, s in slos.items()}
    return PlannerConfig(
        1500, 100, interval_s=5, cooldown_s=20, local_prefill=True, classes=parse_classes(classes)
    )


def model(fc, cfg):
    return RATES[fc.classes[0]]


@pytest.mark.parametrize("start", [MM, PD], ids=["from-2M", "from-1P1D"])
def test_the_planner_holds_each_phases_better_layout(start):
    arrivals, bounds, slos = trace()
    steps, timeline = replay(
        arrivals, config(slos), model, start, until_s=bounds[-1][1], outcome=outcomes(slos)
    )
    held = phase_layouts(timeline, bounds)
    serving_2m = held[0].get("2M", 0) + held[0].get("2D", 0) + held[0].get("1D/1M", 0)
    serving_pd = held[1].get("1P/1D", 0) + held[1].get("1P/1M", 0)
    assert serving_2m >= 0.7  # code: 2M (or what serves as it) within ~15 s
    assert serving_pd >= 0.85  # long: 1P/1D within ~35 s of its 240
    moved = [s for s in steps if s.decision.moves]
    assert len(moved) == (1 if start == MM else 2)  # one move per transition, no flapping


QUIET_STRICT = TRACE.parent / "elastic-quiet-strict.yaml"
# The quiet host's static runs of that trace (docs/benchmarks.md, "Quiet host").
MET_QUIET_STRICT = {
    ("code", "2M"): 0.86, ("code", "1P/1D"): 0.62, ("long", "2M"): 0.32, ("long", "1P/1D"): 1.0,
}  # fmt: skip


def test_a_change_of_traffic_is_followed_after_eight_requests():
    """`code` at 10 req/s, then 1024-token prompts at 1.2 req/s: the forecast sees the new
    traffic once 8 long prompts arrived (`shift_point`), so the move to 1P/1M comes at the
    first pass after ~7 s of the phase — it came 20 s in while the `code` requests had to
    age out of the mix window first (and 16-20 s in, in every live run)."""
    arrivals, bounds, slos = trace(QUIET_STRICT)
    steps, timeline = replay(
        arrivals,
        config(slos),
        model,
        MM,
        until_s=bounds[-1][1],
        outcome=outcomes(slos, MET_QUIET_STRICT),
    )
    moved = [(s.time, s.decision.moves) for s in steps if s.decision.moves]
    assert moved == [(bounds[1][0] + 10.0, (("w1", "prefill"),))]
    assert phase_layouts(timeline, bounds)[0] == {"2M": 1.0}
