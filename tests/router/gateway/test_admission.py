"""Admission: queued prompt tokens -> predicted TTFT -> refuse early; the queue cap sheds
the lowest priority first; the TTFT model learns the rate from measured TTFTs."""

from __future__ import annotations

import pytest

from pdserve.router.gateway.admission import Admission
from pdserve.router.gateway.config import GatewayConfig
from pdserve.router.gateway.errors import RateLimitedError
from pdserve.router.gateway.ttft_model import TtftModel


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock=None, elsewhere=lambda: None, **config) -> Admission:
    return Admission(GatewayConfig(**config), elsewhere, clock or Clock())


def test_off_by_default():
    assert not make().is_active
    assert make(max_queued_requests=3).is_active
    assert make(admission_ttft_ms=500).is_active


def test_ttft_prediction_refuses_what_would_miss_with_the_time_to_wait():
    # Prior: 1000 tokens/s. Target 100 ms. 150 tokens queued -> another 10 predicts 160 ms.
    admission = make(admission_ttft_ms=100, admission_prefill_tokens_per_s=1000)
    first = admission.admit("a", 150)  # nothing ahead: admitted whatever its size
    assert admission.num_queued_tokens == 150
    with pytest.raises(RateLimitedError) as info:
        admission.admit("b", 10)
    assert info.value.code == "ttft_unattainable"
    assert info.value.retry_after_s == pytest.approx(0.060)
    assert info.value.response_headers()["retry-after-ms"] == "60"
    assert info.value.response_headers()["retry-after"] == "1"
    admission.started(first)  # its first token: the queue is empty again
    assert admission.num_queued_tokens == 0
    admission.admit("b", 10)


def test_priority_only_waits_behind_equal_or_more_important_work():
    admission = make(admission_ttft_ms=100, admission_prefill_tokens_per_s=1000)
    admission.admit("low", 150, priority=5)
    with pytest.raises(RateLimitedError):
        admission.admit("low2", 10, priority=5)
    admission.admit("urgent", 90, priority=0)  # 150 low-priority tokens are not ahead
    assert admission.tokens_ahead(0) == 90
    assert admission.tokens_ahead(5) == 240


def test_queue_cap_refuses_or_evicts_the_newest_lowest_priority():
    admission = make(max_queued_requests=2)
    evicted = []
    old = admission.admit("old", 10, priority=3)
    new = admission.admit("new", 10, priority=3)
    new.on_evict.append(lambda: evicted.append("new"))
    with pytest.raises(RateLimitedError) as info:
        admission.admit("same", 10, priority=3)  # not more important: refused
    assert info.value.code == "queue_full"
    urgent = admission.admit("urgent", 10, priority=1)
    assert evicted == ["new"] and new.is_evicted and not new.is_queued
    assert old.is_queued and urgent.is_queued and admission.num_queued == 2
    admission.release(new)  # the evicted request's end: nothing left to release
    assert admission.num_queued == 2 and admission.num_queued_tokens == 20


def test_release_is_idempotent_and_partial_starts_count_down():
    admission = make(max_queued_requests=4)
    ticket = admission.admit("r", 30)
    admission.started(ticket, 10)
    assert admission.num_queued_tokens == 20 and admission.num_queued == 1
    admission.release(ticket)
    admission.release(ticket)
    assert admission.num_queued_tokens == 0 and admission.num_queued == 0


def test_load_reported_by_the_client_beyond_the_ledger_counts_for_everyone():
    reported = {"tokens": 0}
    admission = make(elsewhere=lambda: reported["tokens"], max_queued_requests=9)
    admission.admit("a", 100)
    reported["tokens"] = 100  # the same request, seen by the workers
    assert admission.tokens_ahead(0) == 100
    reported["tokens"] = 400  # 300 more from elsewhere (another router)
    assert admission.tokens_ahead(-5) == 300


def test_the_model_learns_base_and_rate_from_measured_ttfts():
    clock = Clock()
    admission = make(clock, admission_ttft_ms=1000, admission_prefill_tokens_per_s=100)
    # True system: 50 ms + 1 ms per token (1000 tokens/s); nothing decoding.
    for i, work in enumerate([100, 400, 200, 800, 300, 600] * 3):
        ticket = admission.admit(f"r{i}", work)
        clock.now += 0.050 + work / 1000
        admission.started(ticket)
        admission.release(ticket)
    base, per_token, per_seq = admission.model.coefficients()
    assert base == pytest.approx(0.050, rel=1e-6)
    assert per_token == pytest.approx(0.001, rel=1e-6)
    assert per_seq == 0.0


def test_the_model_separates_decode_load_from_queued_work():
    model = TtftModel(prior_tokens_per_s=100)
    # True system: 20 ms + 0.5 ms per token + 10 ms per decoding sequence.
    for work, decoding in [(100, 0), (500, 4), (300, 10), (800, 2), (200, 16), (600, 8)] * 3:
        model.observe(work, 0.020 + work * 0.0005 + decoding * 0.010, decoding)
    base, per_token, per_seq = model.coefficients()
    assert (base, per_token, per_seq) == (
        pytest.approx(0.020, rel=1e-6),
        pytest.approx(0.0005, rel=1e-6),
        pytest.approx(0.010, rel=1e-6),
    )
    assert model.predict(400, 3) == pytest.approx(0.020 + 0.2 + 0.03)


def test_collinear_inputs_fall_back_to_work_alone():
    model = TtftModel(prior_tokens_per_s=100)
    for work in [100, 200, 300, 400, 500]:
        model.observe(work, 0.1 + work * 0.001, decoding=work / 100)  # decoding ~ work
    base, per_token, per_seq = model.coefficients()
    assert per_seq == 0.0 and per_token == pytest.approx(0.001)
    assert base == pytest.approx(0.1)


def test_equal_works_fall_back_to_the_mean_time_per_token():
    model = TtftModel(prior_tokens_per_s=10)
    assert model.predict(50) == pytest.approx(5.0)  # the prior
    for _ in range(5):
        model.observe(100, 0.5)
    assert model.coefficients() == (0.0, pytest.approx(0.005), 0.0)


def test_running_sequences_are_counted_until_release():
    admission = make(max_queued_requests=9)
    ticket = admission.admit("r", 10, num_seqs=3)
    assert admission.num_running == 0
    admission.started(ticket)
    assert admission.num_running == 3
    assert admission.admit("s", 10).decoding == 3
    admission.release(ticket)
    admission.release(ticket)
    assert admission.num_running == 0


def fitted_model() -> TtftModel:
    """A fitted model saying exactly 1 ms per token, no base."""
    model = TtftModel(prior_tokens_per_s=10)
    for work in (100, 200, 300, 400, 500):
        model.observe(work, work / 1000)
    assert model.is_fitted and model.predict(400) == pytest.approx(0.4)
    return model


def run_late_requests(admission: Admission, clock: Clock, count: int, fit=fitted_model):
    """`count` requests of 400 tokens, each taking 1.5x the fitted prediction."""
    for i in range(count):
        admission.model = fit()  # hold the fit still: only the ratios learn
        ticket = admission.admit(f"late{i}-{clock.now}", 400)
        clock.now += 0.6  # predicted 0.4 s
        admission.started(ticket)
        admission.release(ticket)


def test_predictions_scale_by_how_late_recent_requests_were():
    clock = Clock()
    admission = make(clock, admission_ttft_ms=1000)
    assert admission.correction == 1.0
    run_late_requests(admission, clock, 8)
    assert admission.correction == pytest.approx(1.5)
    admission.model = fitted_model()
    admission.admit("a", 300)  # alone: admitted
    admission.admit("b", 300)  # 600 tokens: 0.6 s raw, 0.9 s corrected: fits 1 s
    with pytest.raises(RateLimitedError) as info:
        admission.admit("c", 100)  # 700: 0.7 s raw would fit; 1.05 s corrected does not
    assert "predicted 1050 ms" in str(info.value)


def test_the_correction_forgets_old_ratios_and_ignores_the_prior():
    clock = Clock()
    admission = make(clock, admission_ttft_ms=1000, admission_prefill_tokens_per_s=1000)
    run_late_requests(admission, clock, 8, fit=lambda: TtftModel(1000))  # the prior's errors
    assert admission.correction == 1.0
    run_late_requests(admission, clock, 8)
    assert admission.correction == pytest.approx(1.5)
    clock.now += 31  # that load has passed
    assert admission.correction == 1.0


def test_a_request_still_waiting_past_its_prediction_raises_the_correction_at_once():
    clock = Clock()
    admission = make(clock, admission_ttft_ms=1000)
    admission.model = fitted_model()
    first = admission.admit("a", 300)  # alone; predicted 0.3 s
    assert admission.refuse_early(0, 300) is None  # 600 tokens: 0.6 s fits the 1 s target
    clock.now += 0.6  # no TTFT measured yet, but "a" has waited 2x its prediction
    assert admission.correction == pytest.approx(2.0)
    refused = admission.refuse_early(0, 300)
    assert refused is not None and "predicted 1200 ms" in str(refused)
    admission.started(first)  # measured at 2x: one ratio, under MIN_RATIOS
    assert admission.correction == 1.0
    assert admission.refuse_early(0, 300) is None


def test_waiting_requests_count_only_with_a_fitted_prediction_and_for_30_s():
    clock = Clock()
    admission = make(clock, admission_ttft_ms=1000, admission_prefill_tokens_per_s=1000)
    admission.admit("prior", 300, priority=1)  # predicted by the prior: says nothing
    admission.model = fitted_model()
    admission.admit("fitted", 300, priority=0)  # the other is not ahead of it
    clock.now += 0.9
    assert admission.correction == pytest.approx(3.0)  # 0.9 / 0.3, the fitted one only
    clock.now += 30  # older than the measured ratios are kept: no longer evidence
    assert admission.correction == 1.0


def test_only_overdue_requests_a_newcomer_waits_behind_raise_its_correction():
    clock = Clock()
    admission = make(clock, admission_ttft_ms=1000)
    admission.model = fitted_model()
    admission.admit("background", 300, priority=5)  # predicted 0.3 s
    clock.now += 0.9  # 3x late: overtaken, or the host slowed down
    admission.admit("urgent", 300, priority=0)  # just now: on time so far
    assert admission.correction_for(5) == pytest.approx(3.0)
    assert admission.correction_for(0) == 1.0  # a priority-0 request does not wait behind it
    assert admission.refuse_early(0, 300) is None  # 600 tokens: 0.6 s
    refused = admission.refuse_early(5, 100)  # 700 tokens: 0.7 s x 3
    assert refused is not None and "predicted 2100 ms" in str(refused)
