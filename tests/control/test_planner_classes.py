"""The SLO planner's workload classes, output-length hints and transitions, on synthetic
observations: per-class SLOs parse (errors name the class), each class's mix is rated
under its own SLO and the rates blend by share, a client's `expected_output_tokens` is
what the rate model sees, a new traffic mix shows in the forecast within the mix window,
and a transition's second move does not wait for the cooldown."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.control.planner import (
    DEFAULT_CLASS,
    Forecast,
    Layout,
    PlannerConfig,
    RequestLog,
    RoleRates,
    decide,
    forecast,
)
from pdserve.control.planner_loop import PlannerLoop
from pdserve.control.slo_classes import class_rates, parse_classes
from pdserve.errors import ConfigError

CLASSES = parse_classes(
    {"long": {"ttft_ms": 5000, "tpot_ms": 50}, "code": {"ttft_ms": 400, "tpot_ms": 50}}
)
CONFIG = PlannerConfig(1500, 100, interval_s=5, window_s=30, classes=CLASSES)


class RecordingModel:
    """A rate model with fixed answers per SLO that records what it was asked."""

    def __init__(self, by_slo: dict[tuple[float, float], RoleRates]) -> None:
        self.by_slo = by_slo
        self.calls: list[tuple[Forecast, PlannerConfig]] = []

    def __call__(self, fc: Forecast, config: PlannerConfig) -> RoleRates:
        self.calls.append((fc, config))
        return self.by_slo[(config.slo_ttft_ms, config.slo_tpot_ms)]


def test_classes_parse_and_bad_ones_name_the_class():
    assert CLASSES == (("long", 5000.0, 50.0), ("code", 400.0, 50.0))
    assert CONFIG.class_of("long") == "long"
    assert CONFIG.class_of("poetry") == CONFIG.class_of(None) == DEFAULT_CLASS
    assert CONFIG.for_class("code").slo_tpot_ms == 50 and CONFIG.for_class("x") is CONFIG
    bad = [
        ({"long": {"ttft_ms": 5000}}, "slo_classes.long"),
        ({"long": {"ttft_ms": 0, "tpot_ms": 5}}, "slo_classes.long.ttft_ms"),
        ({"long": {"ttft_ms": "fast", "tpot_ms": 5}}, "slo_classes.long.ttft_ms"),
        ({"long": {"ttft_ms": 1, "tpot_ms": True}}, "slo_classes.long.tpot_ms"),
        ({"a b": {"ttft_ms": 1, "tpot_ms": 1}}, "slo_classes.a b"),
        ({"default": {"ttft_ms": 1, "tpot_ms": 1}}, "slo_classes.default"),
        (["long"], "slo_classes"),
    ]
    for data, field in bad:
        with pytest.raises(ConfigError) as info:
            parse_classes(data)
        assert info.value.field == field


def test_serve_config_takes_slo_classes_with_the_planner_only(tmp_path):
    from pdserve.serve import ServeConfig

    profile = tmp_path / "p.json"
    profile.write_text("{}")
    data = {
        "planner": "slo",
        "slo_ttft_ms": 1500,
        "slo_tpot_ms": 100,
        "planner_profile": str(profile),
        "slo_classes": {"long": {"ttft_ms": 5000, "tpot_ms": 50}},
    }
    assert ServeConfig.from_dict(data).planner_config().classes == (("long", 5000.0, 50.0),)
    with pytest.raises(ConfigError, match=r"slo_classes\.long\.tpot_ms"):
        ServeConfig.from_dict({**data, "slo_classes": {"long": {"ttft_ms": 1, "tpot_ms": -1}}})
    with pytest.raises(ConfigError, match="planner: slo"):
        ServeConfig.from_dict({"slo_classes": {"long": {"ttft_ms": 1, "tpot_ms": 1}}})


def test_each_class_is_rated_under_its_own_slo_and_the_rates_blend_by_share():
    model = RecordingModel(
        {
            (1500.0, 100.0): RoleRates(prefill=8.0, decode=4.0, mixed=4.0),  # default (chat)
            (5000.0, 50.0): RoleRates(prefill=2.0, decode=2.0, mixed=0.5),  # long
        }
    )
    mix = ((1024, 128),) * 3 + ((160, 128),)
    fc = Forecast(4.0, mix, ("long", "long", "long", DEFAULT_CLASS))
    rates = class_rates(model, fc, CONFIG)
    # per role: 1 / (0.75 / long + 0.25 / default)
    assert rates.prefill == pytest.approx(1 / (0.75 / 2.0 + 0.25 / 8.0))
    assert rates.decode == pytest.approx(1 / (0.75 / 2.0 + 0.25 / 4.0))
    assert rates.mixed == pytest.approx(1 / (0.75 / 0.5 + 0.25 / 4.0))
    asked = {(c.slo_ttft_ms, c.slo_tpot_ms): f.mix for f, c in model.calls}
    assert asked == {(5000.0, 50.0): ((1024, 128),) * 3, (1500.0, 100.0): ((160, 128),)}
    # One class: the model's answer as it is, under that class's SLO.
    model.calls.clear()
    only = Forecast(4.0, mix[:3], ("long",) * 3)
    assert class_rates(model, only, CONFIG) == RoleRates(2.0, 2.0, 0.5)
    assert model.calls == [(only, CONFIG.for_class("long"))]


def test_the_hint_is_the_output_length_the_rate_model_sees():
    hinted, budgeted = RequestLog(), RequestLog()
    for t in range(40):
        # The same traffic; one client says it expects 16 tokens of its 1024 budget.
        hinted.record(512, 16, now=t * 0.25, slo_class="long")
        budgeted.record(512, 1024, now=t * 0.25, slo_class="long")
    model = RecordingModel({(5000.0, 50.0): RoleRates(4.0, 4.0, 2.0)})
    for log in (hinted, budgeted):
        class_rates(model, forecast(log, CONFIG, now=10.0), CONFIG)
    (fc_hinted, _), (fc_budget, _) = model.calls
    assert set(fc_hinted.mix) == {(512, 16)} and set(fc_budget.mix) == {(512, 1024)}
    assert (fc_hinted.signature, fc_budget.signature) == ((512, 16), (512, 1024))


def test_a_new_mix_shows_within_the_mix_window():
    log = RequestLog()
    for i in range(600):  # a minute of code at 10 req/s
        log.record(64, 32, now=i * 0.1, slo_class="code")
    for i in range(40):  # then 20 s of long prompts at 2 req/s
        log.record(1024, 128, now=60 + i * 0.5, slo_class="long")
    fc = forecast(log, CONFIG, now=80.0)
    assert set(fc.classes) == {"long"} and set(fc.mix) == {(1024, 128)}
    # Fewer than MIN_MIX in the window: the latest MIN_MIX of the history are the mix.
    sparse = RequestLog()
    for i in range(20):
        sparse.record(100 + i, 8, now=i * 1.2)
    assert [p for p, _ in forecast(sparse, CONFIG, now=24.0).mix] == list(range(104, 120))


def test_a_transition_finishes_without_waiting_for_the_cooldown():
    config = PlannerConfig(1000, 100, interval_s=5, window_s=30, cooldown_s=60)
    rates = RoleRates(prefill=2.0, decode=2.2, mixed=0.8)  # long prompts: P/D wins
    busy = Forecast(10.0, ((2048, 64),))
    half = {"w0": "prefill", "w1": "mixed"}  # the first move of 2M -> 1P+1D is done
    d = decide(half, busy, rates, config, now=10.0, last_switch=5.0, heading=Layout(1, 1, 0))
    assert d.moves == (("w1", "decode"),)
    # A new transition (another target) still waits for the cooldown.
    d = decide(half, busy, rates, config, now=10.0, last_switch=5.0, heading=Layout(0, 0, 2))
    assert d.moves == () and "cooling" in d.reason


def test_the_loop_moves_both_workers_in_two_passes_then_cools_down():
    config = PlannerConfig(1000, 100, interval_s=5, window_s=30, cooldown_s=60)
    log = RequestLog()
    for t in range(300):
        log.record(2048, 64, now=t * 0.1)
    roles = {"w0": "mixed", "w1": "mixed"}
    state = {"rates": RoleRates(prefill=2.0, decode=2.2, mixed=0.8)}

    async def switch(worker, role, reason):
        roles[worker] = role

    loop = PlannerLoop(config, log, lambda fc, cfg: state["rates"], lambda: dict(roles), switch)

    async def main():
        await loop.step(now=30.0)
        assert roles == {"w0": "prefill", "w1": "mixed"}
        await loop.step(now=35.0)  # the same transition: no cooldown in between
        assert roles == {"w0": "prefill", "w1": "decode"} and loop.heading == Layout(1, 1, 0)
        await loop.step(now=36.0)
        assert loop.heading is None  # arrived
        state["rates"] = RoleRates(prefill=6.0, decode=2.0, mixed=2.5)  # short prompts now
        decision = await loop.step(now=40.0)
        assert decision.moves == () and "cooling" in decision.reason

    asyncio.run(main())


# -- calibration: the model's rates scaled to what the cluster delivers --------------------

SATURATED = {"w0": "mixed", "w1": "mixed"}
PD_BETTER = RoleRates(prefill=6.0, decode=6.0, mixed=2.0)  # 2M 4 req/s, 1P+1D 6 req/s


def log_with_outcomes(num_met: int, num_missed: int, span_s: float = 20.0) -> RequestLog:
    """2 req/s offered for a minute; `num_met + num_missed` finished in the last `span_s`."""
    log = RequestLog()
    for i in range(120):
        log.record(1024, 128, now=60.0 - i * 0.5, slo_class="long")
    total = num_met + num_missed
    for i in range(total):
        ttft = 1.0 if i < num_met else 9.0  # the long class: TTFT 5000 ms
        log.record_outcome(ttft, 0.04, "long", now=60.0 - span_s + (i + 1) * span_s / total)
    return log


def test_a_layout_that_meets_its_slos_is_not_recalibrated():
    from pdserve.control.calibration import calibrate

    log = log_with_outcomes(num_met=38, num_missed=2)  # 1.9 req/s of 2.0 offered: >= 90 %
    fc = forecast(log, CONFIG, now=60.0)
    rates, cal = calibrate(PD_BETTER, Layout(0, 0, 2), fc, log, CONFIG, now=60.0)
    assert (rates, cal.factor, cal.num_outcomes) == (PD_BETTER, 1.0, 40)
    # Fewer finished than the forecast says arrived (1.5 of 2.0 req/s: Poisson noise, or
    # requests still running) but every one met its SLO: no evidence of saturation.
    slow = log_with_outcomes(num_met=30, num_missed=0)
    rates, cal = calibrate(PD_BETTER, Layout(0, 0, 2), fc, slow, CONFIG, now=60.0)
    assert (rates, cal.factor, cal.delivered) == (PD_BETTER, 1.0, pytest.approx(1.5))
    few = RequestLog()
    few.record_outcome(None, None, now=59.0)  # a miss, but too few outcomes to judge by
    assert calibrate(PD_BETTER, Layout(0, 0, 2), fc, few, CONFIG, 60.0)[1].factor == 1.0


def test_a_saturated_layout_scales_the_rates_to_what_it_delivers():
    from pdserve.control.calibration import calibrate

    log = log_with_outcomes(num_met=16, num_missed=14)  # 0.8 req/s met of 2.0 offered
    fc = forecast(log, CONFIG, now=60.0)
    assert fc.rate == pytest.approx(2.0)
    # Uncalibrated, both layouts serve the 2 req/s on paper: the planner holds.
    assert decide(SATURATED, fc, PD_BETTER, CONFIG, 60.0, None).moves == ()
    rates, cal = calibrate(PD_BETTER, Layout(0, 0, 2), fc, log, CONFIG, now=60.0)
    assert cal.factor == pytest.approx(0.8 / 4.0) and cal.delivered == pytest.approx(0.8)
    assert rates == RoleRates(*(pytest.approx(r * 0.2) for r in (6.0, 6.0, 2.0)))
    d = decide(SATURATED, fc, rates, CONFIG, 60.0, None)  # 2M delivers 0.8, P/D would 1.2
    assert d.target == Layout(1, 1, 0) and d.moves == (("w0", "prefill"), ("w1", "decode"))
    # Nothing met at all: the floor keeps the layouts comparable (not all zero).
    none_met = log_with_outcomes(num_met=0, num_missed=30)
    _, cal = calibrate(PD_BETTER, Layout(0, 0, 2), fc, none_met, CONFIG, now=60.0)
    assert cal.factor == pytest.approx(0.5 / 20.0 / 4.0)


def test_the_loop_explains_a_calibrated_switch():
    log = log_with_outcomes(num_met=16, num_missed=14)
    roles = dict(SATURATED)

    async def switch(worker, role, reason):
        roles[worker] = role

    loop = PlannerLoop(CONFIG, log, lambda fc, cfg: PD_BETTER, lambda: dict(roles), switch)
    decision = asyncio.run(loop.step(now=60.0))
    assert roles == {"w0": "prefill", "w1": "mixed"}
    assert "model rates x0.20: 2M met the SLOs of 0.80 req/s of 2.00" in decision.reason


def test_only_requests_admitted_after_the_last_switch_count():
    from pdserve.control.calibration import calibrate

    log = RequestLog()
    for i in range(120):
        log.record(1024, 128, now=60.0 - i * 0.5, slo_class="long")
    for i in range(30):  # 30 misses, all of requests queued before the switch at t = 45
        log.record_outcome(9.0, 0.04, "long", now=40.0 + i * 0.6, arrival=30.0 + i * 0.5)
    fc = forecast(log, CONFIG, now=60.0)
    current = Layout(1, 1, 0)
    _, blamed = calibrate(PD_BETTER, current, fc, log, CONFIG, now=60.0)
    assert blamed.factor < 0.1  # without `since`: the old layout's backlog counts
    rates, cal = calibrate(PD_BETTER, current, fc, log, CONFIG, now=60.0, since=45.0)
    assert (rates, cal.factor, cal.num_outcomes) == (PD_BETTER, 1.0, 0)


def test_delivered_is_counted_over_the_time_there_was_traffic():
    from pdserve.control.calibration import calibrate

    log = RequestLog()  # traffic started 7 s ago at 3 req/s; 18 finished, all in their SLO
    for i in range(21):
        log.record(64, 32, now=53.0 + i / 3, slo_class="long")
    for i in range(18):
        log.record_outcome(0.2, 0.03, "long", now=54.0 + i / 3, arrival=53.0 + i / 3)
    fc = forecast(log, CONFIG, now=60.0)
    rates, cal = calibrate(PD_BETTER, Layout(0, 0, 2), fc, log, CONFIG, now=60.0)
    # 18 met over the 7 s of traffic (not over the 20 s window): 2.6 req/s, nothing scaled.
    assert cal.delivered == pytest.approx(18 / 7.0) and (rates, cal.factor) == (PD_BETTER, 1.0)
    # Evidence over 10 s of traffic would be counted over 10 s, not 20: 2 req/s delivered.
    longer = RequestLog()
    for i in range(30):
        longer.record(64, 32, now=50.0 + i / 3, slo_class="long")
        longer.record_outcome(0.2, 0.03, "long", now=50.5 + i / 3, arrival=50.0 + i / 3)
    _, cal = calibrate(PD_BETTER, Layout(0, 0, 2), fc, longer, CONFIG, now=60.0)
    assert cal.delivered == pytest.approx(29 / 10.0) and cal.factor == 1.0
