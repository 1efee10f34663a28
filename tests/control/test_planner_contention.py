"""The planner's contention term (control/planner.py `Layout.capacity`): a worker's rate in
a layout lies between its rate alone and beside a busy neighbour, by how busy the other
workers are at that layout's capacity — hand-computed fixed points, and the decision it
changes."""

from __future__ import annotations

import pytest

from pdserve.control.calibration import calibrate
from pdserve.control.planner import (
    Forecast,
    Layout,
    PlannerConfig,
    RequestLog,
    RoleRates,
    decide,
    propose,
    rate_beside,
)
from pdserve.control.slo_classes import class_rates

CONFIG = PlannerConfig(slo_ttft_ms=1000, slo_tpot_ms=100, interval_s=10, window_s=30)
MM = {"w0": "mixed", "w1": "mixed"}
BUSY = Forecast(rate=10.0, mix=((64, 256),))
# Alone, two mixed workers (2 x 1.25) beat 1P + 1D (decode-bound, 2.2) by 14 %; beside a
# busy neighbour every role runs at 3/4 of its rate alone.
SHORT = RoleRates(6.0, 2.2, 1.25, 4.5, 1.65, 0.9375)


def test_rate_beside_weights_the_time_per_request():
    assert rate_beside(2.0, 1.0, 0.0) == 2.0
    assert rate_beside(2.0, 1.0, 1.0) == 1.0
    assert rate_beside(2.0, 1.0, 0.5) == pytest.approx(1 / (0.25 + 0.5))
    assert rate_beside(2.0, 2.0, 0.7) == 2.0  # no contention: exactly alone
    assert rate_beside(0.0, 1.0, 0.5) == 0.0


def test_without_busy_rates_capacity_is_distserves_rule_exactly():
    rates = RoleRates(6.0, 2.2, 1.25)
    assert Layout(0, 0, 2).capacity(rates) == 2.5
    assert Layout(1, 1, 0).capacity(rates) == 2.2
    assert Layout(1, 0, 1).capacity(rates) == 1.25


def test_mixed_workers_at_capacity_both_run_at_their_busy_rate():
    assert Layout(0, 0, 2).capacity(SHORT) == pytest.approx(2 * 0.9375)
    assert Layout(0, 0, 1).capacity(SHORT) == 1.25  # one worker: nobody to contend with


def test_a_lightly_used_prefill_worker_slows_its_decode_worker_little():
    # Fixed point by hand: decode limits the split; the prefill worker is busy
    # u = split / 6-ish of the time, and the decode worker runs at
    # 1 / ((1 - u) / 2.2 + u / 1.65); the prefill worker beside a fully busy decode
    # worker at its busy rate 4.5.
    split = 2.2
    for _ in range(10):
        prefill = 4.5  # the decode worker is always busy at capacity
        decode = 1 / ((1 - split / prefill) / 2.2 + (split / prefill) / 1.65)
        split = min(prefill, decode)
    capacity = Layout(1, 1, 0).capacity(SHORT)
    assert capacity == pytest.approx(split, rel=1e-3)
    assert 1.65 < capacity < 2.2


def test_contention_turns_the_choice_to_the_split_that_idles_less():
    alone = RoleRates(6.0, 2.2, 1.25)
    assert propose(BUSY, alone, 2)[0].layout == Layout(0, 0, 2)  # 2.5 vs 2.2
    best = propose(BUSY, SHORT, 2)[0]
    assert best.layout == Layout(1, 1, 0)  # ~1.97 vs 1.875
    d = decide(MM, BUSY, SHORT, CONFIG, now=100.0, last_switch=None)
    assert d.current_goodput == pytest.approx(1.875)
    # +5 % is inside the 10 % hysteresis: the planner holds rather than pay a switch.
    assert d.moves == () and "hysteresis" in d.reason


def test_calibration_and_class_blending_keep_the_busy_rates():
    log = RequestLog()
    for i in range(20):  # 20 finished requests in the last 20 s, every one missing
        log.record_outcome(5.0, 1.0, now=95.0 + i * 0.25, arrival=90.0)
    scaled, calibration = calibrate(SHORT, Layout(0, 0, 2), BUSY, log, CONFIG, now=100.0)
    assert calibration.factor < 1
    assert scaled.mixed_busy == pytest.approx(0.9375 * calibration.factor)
    assert scaled.busy("decode") == pytest.approx(1.65 * calibration.factor)

    def model(fc, config):
        return SHORT if config.slo_tpot_ms == 100 else RoleRates(2.0, 2.0, 1.0, 2.0, 2.0, 1.0)

    config = PlannerConfig(1000, 100, classes=(("long", 5000.0, 50.0),))
    fc = Forecast(4.0, ((64, 256), (1024, 128)), ("default", "long"))
    blended = class_rates(model, fc, config)
    assert blended.mixed == pytest.approx(1 / (0.5 / 1.25 + 0.5 / 1.0))
    assert blended.mixed_busy == pytest.approx(1 / (0.5 / 0.9375 + 0.5 / 1.0))

    def partial_model(fc, config):
        return RoleRates(6.0, 2.2, 1.25) if config.slo_tpot_ms == 100 else SHORT

    partial = class_rates(partial_model, fc, config)
    assert partial.mixed_busy is None  # one class without busy rates: none blended


def test_a_lone_prefill_or_decode_worker_is_never_proposed():
    # Long prompts on a host with strong contention (runs/B's rates, rounded): one mixed
    # worker beside an idle decode worker would rate 2.21, above 1P + 1D, but a lone
    # decode worker is not idle in auto mode (it prefills locally).
    long = RoleRates(4.19, 4.19, 2.21, 1.98, 2.56, 0.81)
    assert Layout(0, 1, 1).capacity(long) == 2.21
    ranked = propose(Forecast(rate=10.0, mix=((1024, 128),)), long, 2)
    assert [p.layout for p in ranked] == [Layout(1, 1, 0), Layout(0, 0, 2)]
    assert ranked[0].predicted_goodput == pytest.approx(Layout(1, 1, 0).capacity(long))
    assert ranked[1].predicted_goodput == pytest.approx(2 * 0.81)
