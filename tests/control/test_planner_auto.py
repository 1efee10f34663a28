"""The planner in `auto` mode (`PlannerConfig.local_prefill`): roles serve as the router
makes them serve (`Layout.serving`), so a transition between 2M and 1P/1D is one move,
and a transition already decided is finished even when the gain left is under the
hysteresis. Hand-computed rates; the replay on the elastic trace is test_planner_trace.py."""

from __future__ import annotations

import pytest

from pdserve.control.planner import (
    Forecast,
    Layout,
    PlannerConfig,
    RoleRates,
    decide,
    propose,
)

AUTO = PlannerConfig(1000, 100, interval_s=5, cooldown_s=20, local_prefill=True)
LITERAL = PlannerConfig(1000, 100, interval_s=5, cooldown_s=20)
SHORT = RoleRates(prefill=6.0, decode=2.0, mixed=2.5)  # 2M 5.0 vs 1P/1D 2.0
LONG_TIGHT = RoleRates(prefill=2.0, decode=2.2, mixed=0.8)  # 1P/1D 2.0 vs 2M 1.6
BUSY = Forecast(rate=10.0, mix=((256, 128),))
MM = {"w0": "mixed", "w1": "mixed"}
PD = {"w0": "prefill", "w1": "decode"}


def test_roles_serve_as_the_router_uses_them_in_auto_mode():
    assert Layout(0, 2, 0).serving(True) == Layout(0, 0, 2)  # decode workers prefill
    assert Layout(1, 0, 1).serving(True) == Layout(1, 1, 0)  # mixed: the decode target
    assert Layout(1, 1, 0).serving(True) == Layout(1, 1, 0)
    assert Layout(0, 1, 1).serving(True) == Layout(0, 0, 2)  # nobody prefills for others
    assert Layout(1, 1, 1).serving(True) == Layout(1, 2, 0)
    assert Layout(2, 0, 0).serving(True) == Layout(2, 0, 0)  # nothing decodes: not proposed
    assert Layout(0, 2, 0).serving(False) == Layout(0, 2, 0)


def test_2m_to_1p1d_is_one_move_in_auto_mode_two_otherwise():
    d = decide(MM, BUSY, LONG_TIGHT, AUTO, now=100.0, last_switch=None)
    assert d.target == Layout(1, 0, 1) and d.moves == (("w1", "prefill"),)  # w0 stays
    assert d.predicted_goodput == pytest.approx(2.0) and d.current_goodput == pytest.approx(1.6)
    d = decide(MM, BUSY, LONG_TIGHT, LITERAL, now=100.0, last_switch=None)
    assert d.moves == (("w0", "prefill"), ("w1", "decode"))


def test_1p1d_to_2m_is_one_move_and_the_result_holds():
    d = decide(PD, BUSY, SHORT, AUTO, now=100.0, last_switch=None)
    # 1D/1M and 2D are one move and serve as 2M; the mixed worker is preferred.
    assert d.target == Layout(0, 1, 1) and d.moves == (("w0", "mixed"),)
    # After it, 1D/1M or 2D serves as 2M: nothing left to gain, no second drain.
    for after in ({"w0": "mixed", "w1": "decode"}, {"w0": "decode", "w1": "decode"}):
        d = decide(after, BUSY, SHORT, AUTO, now=130.0, last_switch=105.0)
        assert d.moves == () and d.current_goodput == pytest.approx(5.0)
    # And 1P/1M, the end of 2M -> 1P/1D, is held under long prompts.
    d = decide({"w0": "prefill", "w1": "mixed"}, BUSY, LONG_TIGHT, AUTO, 130.0, 105.0)
    assert d.moves == () and d.current_goodput == pytest.approx(2.0)


def test_equal_layouts_rank_by_mixed_workers_and_none_serves_without_decode():
    ranked = propose(BUSY, SHORT, 2, local_prefill=True)
    # 2M, 1D/1M and 2D all serve as two mixed workers: 5.0 each, most mixed first.
    assert [p.layout for p in ranked[:3]] == [Layout(0, 0, 2), Layout(0, 1, 1), Layout(0, 2, 0)]
    assert {p.predicted_goodput for p in ranked[:3]} == {5.0}
    assert Layout(2, 0, 0) not in {p.layout for p in ranked}


def test_a_decided_transition_finishes_inside_the_hysteresis():
    # Literal roles, 2M -> 1P/1D half done (1P/1M); the rate fell to 1.1 req/s, so 1P/1D
    # (capped at 1.1) beats 1P/1M (1 mixed, 0.8 — its prefill worker has no decode
    # target) by 37 %, but a new transition from 1P/1M would also be measured against
    # the hysteresis: here the gain is 0.3 / 0.8 > 10 %, so check with a closer one.
    close = RoleRates(prefill=2.0, decode=2.2, mixed=1.05)  # 1P/1M 1.05, 1P/1D 2.0
    fc = Forecast(rate=1.1, mix=((1024, 128),))
    half = {"w0": "prefill", "w1": "mixed"}
    d = decide(half, fc, close, LITERAL, 30.0, 25.0, heading=Layout(1, 1, 0))
    assert d.moves == (("w1", "decode"),)  # +4.8 %: continued, not held
    d = decide(half, fc, close, LITERAL, 30.0, None, heading=None)
    assert d.moves == () and "hysteresis" in d.reason  # a new decision would hold
