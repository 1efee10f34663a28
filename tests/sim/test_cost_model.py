"""The cost model: its terms, interpolation, and the fit recovering known parameters."""

from __future__ import annotations

import pytest

from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledRequest
from pdserve.sampling_params import SamplingParams
from pdserve.sim.cost_model import (
    StepCost,
    StepShape,
    StepTimer,
    TimedStep,
    fit_step_cost,
    shape_of,
)


def test_tokens_interpolate_between_knots_and_extend_the_last_segment():
    cost = StepCost((1, 11, 21), (0.01, 0.02, 0.05), 0.0, 0.0, 0.0)
    assert cost.tokens_seconds(1) == 0.01
    assert cost.tokens_seconds(6) == pytest.approx(0.015)
    assert cost.tokens_seconds(16) == pytest.approx(0.035)
    assert cost.tokens_seconds(31) == pytest.approx(0.08)  # slope of the last segment


def test_every_term_adds_up():
    cost = StepCost((1, 101), (0.01, 0.02), 0.001, 1e-6, 1e-5, step_overhead_s=0.002)
    shape = StepShape(num_tokens=51, num_sampled=3, prefill_attention=1000, decode_context=200)
    expected = 0.015 + 2 * 0.001 + 1000 * 1e-6 + 200 * 1e-5 + 0.002
    assert cost.seconds(shape) == pytest.approx(expected)
    assert cost.seconds(StepShape(0, 0, 0, 0)) == 0.0


def test_shape_of_a_scheduler_step():
    params = SamplingParams()
    decode = Request("d", list(range(11)), params)  # 10 computed, the 11th is new
    chunk = Request("p", list(range(300)), params)
    scheduled = [ScheduledRequest(decode, 1, 10), ScheduledRequest(chunk, 100, 50)]
    assert shape_of(scheduled) == StepShape(101, 1, 100 * 150, 11)


def test_the_fit_recovers_the_parameters_that_made_the_samples():
    truth = StepCost((1, 16, 64, 256), (0.008, 0.012, 0.03, 0.1), 0.0004, 2e-7, 1e-6)
    shapes = [StepShape(q, 1, q * q, 0) for q in (16, 64, 256)]
    shapes += [StepShape(q, 1, q * (q + 512), 0) for q in (64, 256)]
    shapes += [StepShape(b, b, 0, b * c) for b in (1, 16, 64) for c in (64, 1024)]
    samples = [TimedStep(s, truth.seconds(s)) for s in shapes]
    fitted = fit_step_cost(samples)
    assert fitted.token_knots == truth.token_knots
    assert fitted.token_seconds == pytest.approx(truth.token_seconds, rel=1e-6)
    assert fitted.row_s == pytest.approx(truth.row_s, rel=1e-6)
    assert fitted.prefill_attention_s == pytest.approx(truth.prefill_attention_s, rel=1e-6)
    assert fitted.decode_attention_s == pytest.approx(truth.decode_attention_s, rel=1e-6)


def test_round_trip_through_a_dict():
    cost = StepCost((1, 8), (0.01, 0.02), 0.001, 1e-7, 1e-6, 0.0005)
    assert StepCost.from_dict(cost.to_dict()) == cost


def test_the_step_timer_gives_the_cost_models_exact_seconds():
    cost = StepCost((1, 16, 300), (0.008, 0.012, 0.05), 0.0004, 2e-7, 1e-6, 0.0005)
    timer = StepTimer(cost, max_tokens=128)
    params = SamplingParams()
    decode = Request("d", list(range(11)), params)
    chunk = Request("p", list(range(300)), params)
    steps = [
        [ScheduledRequest(decode, 1, 10)],
        [ScheduledRequest(decode, 1, 10), ScheduledRequest(chunk, 100, 50)],
        [ScheduledRequest(chunk, 250, 50)],  # past the table: searched as before
        [],
    ]
    for scheduled in steps:
        assert timer(scheduled) == cost.step_seconds(scheduled)  # the same floats


def test_a_prefill_after_context_pins_attention_without_a_fresh_prefill_of_its_size():
    # The quick grid: fresh prefills at 16/64/256/1024 and one prefill of 128 after 1024
    # tokens of context; tokens(N) linear between 64 and 256, so 128 lies on that segment.
    truth = StepCost(
        (1, 4, 16, 64, 256, 1024), (0.009, 0.0095, 0.014, 0.035, 0.1, 0.45), 0.0004, 2e-7, 8e-7
    )
    shapes = [StepShape(q, 1, q * q, 0) for q in (16, 64, 256, 1024)]
    shapes.append(StepShape(128, 1, 128 * (1024 + 128), 0))
    shapes += [StepShape(b, b, 0, b * 65) for b in (1, 4, 16, 64)]
    shapes.append(StepShape(16, 16, 0, 16 * 1025))
    fitted = fit_step_cost([TimedStep(s, truth.seconds(s)) for s in shapes])
    assert fitted.token_knots == truth.token_knots  # no knot at 128
    assert fitted.prefill_attention_s == pytest.approx(truth.prefill_attention_s, rel=1e-6)
    assert fitted.token_seconds == pytest.approx(truth.token_seconds, rel=1e-6)


def test_a_step_with_a_prefill_span_pays_the_layer_path_once():
    cost = StepCost((1, 101), (0.01, 0.02), 0.0, 0.0, 0.0, prefill_step_s=0.005)
    assert cost.seconds(StepShape(3, 3, 0, 30)) == pytest.approx(0.0102)  # decode rows only
    assert cost.seconds(StepShape(3, 1, 4, 10)) == pytest.approx(0.0152)  # a 2-token tail
    assert cost.seconds(StepShape(101, 1, 100 * 100, 10)) == pytest.approx(0.025)
    params = SamplingParams()
    decode = Request("d", list(range(11)), params)
    chunk = Request("p", list(range(300)), params)
    timer = StepTimer(cost, max_tokens=128)
    for scheduled in ([ScheduledRequest(decode, 1, 10)], [ScheduledRequest(chunk, 100, 50)]):
        assert timer(scheduled) == cost.step_seconds(scheduled)
    assert StepCost.from_dict(cost.to_dict()) == cost
    assert cost.scaled(2.0).prefill_step_s == 0.01


def test_the_fit_separates_the_prefill_path_from_decode_rows_of_the_same_size():
    truth = StepCost(
        (1, 16, 64, 256), (0.008, 0.012, 0.03, 0.1), 0.0004, 2e-7, 1e-6, prefill_step_s=0.004
    )
    shapes = [StepShape(q, 1, q * q, 0) for q in (16, 64, 256)]
    shapes += [StepShape(q, 1, q * (q + 512), 0) for q in (64, 256)]
    shapes += [StepShape(b, b, 0, b * c) for b in (1, 16, 64) for c in (64, 1024)]
    fitted = fit_step_cost([TimedStep(s, truth.seconds(s)) for s in shapes])
    assert fitted.prefill_step_s == pytest.approx(0.004, rel=1e-6)
    assert fitted.token_seconds == pytest.approx(truth.token_seconds, rel=1e-6)
    # With fixed knots (a real run's many sizes), the same parameters.
    fixed = fit_step_cost([TimedStep(s, truth.seconds(s)) for s in shapes], knots=(1, 16, 64, 256))
    assert fixed.prefill_step_s == pytest.approx(0.004, rel=1e-6)
