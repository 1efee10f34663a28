"""The SLO planner's decisions on synthetic observations: exact forecasts, the layout the
cost model favours for each mix, switches when they pay, and no flapping on noise."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from pdserve.control.planner import (
    SHIFT_MIN,
    Arrival,
    Forecast,
    Layout,
    PlannerConfig,
    RequestLog,
    RoleRates,
    decide,
    forecast,
    layouts,
    moves,
    propose,
    shift_point,
)
from pdserve.control.planner_loop import PlannerLoop
from pdserve.errors import ConfigError

CONFIG = PlannerConfig(slo_ttft_ms=1000, slo_tpot_ms=100, interval_s=10, window_s=30)
# One worker's goodput per role for two mixes (what SimRates measures from a profile):
SHORT = RoleRates(prefill=6.0, decode=2.0, mixed=2.5)  # short prompts: aggregation wins
LONG_TIGHT = RoleRates(prefill=2.0, decode=2.2, mixed=0.8)  # long prompts, tight TPOT: P/D wins
PD = {"w0": "prefill", "w1": "decode"}
MM = {"w0": "mixed", "w1": "mixed"}


def test_forecast_weights_recent_windows_more():
    log = RequestLog()
    for t in range(0, 10):  # 10 requests 20-25 s ago: 1 req/s in the third window
        log.record(100, 10, now=1000 - 25 + t * 0.5)  # 10 requests in age window 2
    for t in range(20):
        log.record(300, 20, now=1000 - 5 + t * 0.2)  # 20 requests in age window 0
    fc = forecast(log, CONFIG, now=1000.0)
    # windows (newest first): 2.0, 0.0, 1.0 req/s; weights 0.5, 0.25, 0.125
    assert fc.rate == pytest.approx((0.5 * 2.0 + 0.125 * 1.0) / 0.875)
    # the mix: the last mix_window_s (20 s) only, so the older requests are not in it
    assert len(fc.mix) == 20 and set(fc.mix) == {(300, 20)}
    assert fc.signature == (256, 16)  # means 300 and 20 tokens, to 2 significant bits


def _lognormal_arrivals(rng, n, prompt, p_sigma, output, o_sigma, start=0.0, gap=0.1):
    return [
        Arrival(
            start + i * gap,
            max(4, round(rng.lognormvariate(math.log(prompt), p_sigma))),
            max(4, round(rng.lognormvariate(math.log(output), o_sigma))),
        )
        for i in range(n)
    ]


def test_forecast_follows_a_change_of_traffic_within_eight_requests():
    """`code` at 10 req/s for 30 s, then 1024-token prompts at ~1.2 req/s: from the 8th
    long prompt on, the mix is the long prompts alone and the rate theirs, while the
    20 s window still holds ~150 `code` requests (without the shift test the mix would
    stay mostly `code` until they aged out)."""
    log = RequestLog()
    rng = random.Random(0)
    for a in _lognormal_arrivals(rng, 300, 64, 0.5, 32, 0.5, start=0.0, gap=0.1):
        log.record(a.prompt_tokens, a.output_tokens, now=a.time)
    config = PlannerConfig(slo_ttft_ms=100, slo_tpot_ms=15, interval_s=5, window_s=60)
    for i in range(SHIFT_MIN):
        t = 30.0 + i * 0.8
        fc = forecast(log, config, now=t)
        if i < SHIFT_MIN - 1:  # (with 7, the newest 8 are mostly long: seen one early)
            assert len(fc.mix) > 150 and fc.signature[0] < 128  # still `code`
        log.record(1024, 128, now=t)
    fc = forecast(log, config, now=30.0 + SHIFT_MIN * 0.8)
    assert fc.mix == ((1024, 128),) * SHIFT_MIN
    assert fc.rate == pytest.approx((SHIFT_MIN - 1) / ((SHIFT_MIN - 1) * 0.8))


def test_shift_point_finds_the_split_and_ignores_noise():
    """The change point itself, back to `code` after long prompts, and no change found in
    a steady mix as spread as `chat` (prompts lognormal sigma 1.0) in 200 windows."""
    rng = random.Random(1)
    long_prompts = [Arrival(i * 0.8, 1024, 128) for i in range(40)]
    code = _lognormal_arrivals(rng, 12, 64, 0.5, 32, 0.5, start=40.0)
    assert shift_point(long_prompts + code) == 40
    assert shift_point(long_prompts + code[:SHIFT_MIN]) == 40
    assert shift_point(long_prompts + code[: SHIFT_MIN - 2]) is None  # too few to tell
    assert shift_point(long_prompts) is None  # constant lengths: nothing changed
    steady = [
        shift_point(_lognormal_arrivals(random.Random(seed), 200, 160, 1.0, 128, 0.9))
        for seed in range(200)
    ]
    assert steady.count(None) == 200


def test_layouts_cover_every_assignment():
    assert set(layouts(2)) == {
        Layout(0, 0, 2), Layout(0, 1, 1), Layout(0, 2, 0), Layout(1, 0, 1),
        Layout(1, 1, 0), Layout(2, 0, 0),
    }  # fmt: skip


def test_the_mix_decides_the_layout():
    busy = Forecast(rate=10.0, mix=((256, 128),))
    assert propose(busy, SHORT, 2)[0].layout == Layout(0, 0, 2)  # 5.0 vs P/D 2.0
    assert propose(busy, LONG_TIGHT, 2)[0].layout == Layout(1, 1, 0)  # 2.0 vs 1.6
    idle = Forecast(rate=0.5, mix=((256, 128),))  # every layout serves it: keep the flexible one
    assert propose(idle, LONG_TIGHT, 2)[0].layout == Layout(0, 0, 2)


def test_decide_switches_when_it_pays_one_move_at_a_time():
    busy = Forecast(rate=10.0, mix=((2048, 64),))
    d = decide(MM, busy, LONG_TIGHT, CONFIG, now=100.0, last_switch=None)
    assert d.target == Layout(1, 1, 0)
    assert (d.current_goodput, d.predicted_goodput) == (pytest.approx(1.6), pytest.approx(2.0))
    assert d.moves == (("w0", "prefill"), ("w1", "decode"))
    back = decide(PD, Forecast(rate=10.0, mix=((64, 64),)), SHORT, CONFIG, 100.0, None)
    assert back.target == Layout(0, 0, 2) and back.moves == (("w0", "mixed"), ("w1", "mixed"))


def test_it_holds_within_hysteresis_and_while_cooling_down():
    near = RoleRates(prefill=2.0, decode=2.0, mixed=0.95)  # P/D 2.0 vs 2M 1.9: +5 %
    d = decide(MM, Forecast(10.0, ()), near, CONFIG, 100.0, None)
    assert d.moves == () and "hysteresis" in d.reason
    d = decide(MM, Forecast(10.0, ()), LONG_TIGHT, CONFIG, 100.0, last_switch=80.0)
    assert d.moves == () and "cooling" in d.reason


def test_a_collapsed_cluster_does_not_move_on_noise():
    """Near zero a relative margin is no margin: every layout meeting ~nothing (a host
    collapsed under another tenant), "0.04 vs 0.00 req/s" is within a couple of requests
    over the window and moves nothing; a gain of a few requests does."""
    from pdserve.control.planner import MIN_GAIN_REQUESTS

    floor = MIN_GAIN_REQUESTS / CONFIG.mix_window_s  # 0.1 req/s over the 20 s window

    def capacity(seen: dict[Layout, float]):
        return lambda serving: seen.get(serving, 0.0)

    tiny = capacity({Layout(0, 0, 2): 0.04})  # 2M "predicts" 0.04; 1P/1D delivered 0.00
    d = decide(PD, Forecast(10.0, ()), SHORT, CONFIG, 100.0, None, capacity=tiny)
    assert d.moves == () and "hysteresis" in d.reason
    enough = capacity({Layout(0, 0, 2): floor * 1.5})
    d = decide(PD, Forecast(10.0, ()), SHORT, CONFIG, 100.0, None, capacity=enough)
    assert d.target == Layout(0, 0, 2) and d.moves


def test_moves_are_the_fewest_changes():
    roles = {"a": "mixed", "b": "mixed", "c": "decode"}
    assert moves(roles, Layout(1, 1, 1)) == (("b", "prefill"),)  # the first of a role stays
    assert moves(roles, Layout(0, 1, 2)) == ()
    assert moves(roles, Layout(0, 3, 0)) == (("a", "decode"), ("b", "decode"))


def test_noise_around_the_boundary_never_makes_it_flap():
    rng = random.Random(0)
    roles = dict(MM)
    switches = 0
    last = None
    for step in range(60):
        now = step * 10.0
        # rates that wobble +-4 % around a tie between the two layouts
        rates = RoleRates(2.0 * rng.uniform(0.96, 1.04), 2.0, 1.0 * rng.uniform(0.96, 1.04))
        d = decide(roles, Forecast(rng.uniform(8, 12), ()), rates, CONFIG, now, last)
        for worker, role in d.moves[:1]:
            roles[worker] = role
            switches += 1
            last = now
    assert switches == 0


def test_the_loop_follows_a_phase_change_and_cools_down():
    config = PlannerConfig(
        slo_ttft_ms=1000, slo_tpot_ms=100, interval_s=10, window_s=30, cooldown_s=25
    )
    log = RequestLog()
    roles = dict(MM)
    phase = {"rates": SHORT}
    switched: list[tuple[str, str, str]] = []

    async def switch(worker, role, reason):
        switched.append((worker, role, reason))
        roles[worker] = role

    loop = PlannerLoop(config, log, lambda fc, cfg: phase["rates"], lambda: dict(roles), switch)

    async def main():
        for t in range(400):
            log.record(256, 128, now=float(t) * 0.1)  # 10 req/s throughout
        assert (await loop.step(now=10.0)).moves == ()  # short prompts: 2 mixed is best
        phase["rates"] = LONG_TIGHT  # the traffic turns to long prompts with a tight TPOT
        await loop.step(now=11.0)
        assert switched == [("w0", "prefill", "planner")]
        loop.last_switch = 11.0
        await loop.step(now=20.0)  # the same transition's second move: no cooldown
        assert switched[-1] == ("w1", "decode", "planner") and roles == PD
        loop.last_switch = 20.0
        phase["rates"] = SHORT  # and back at once: a new transition waits for the cooldown
        assert "cooling" in (await loop.step(now=30.0)).reason and roles == PD
        await loop.step(now=46.0)
        assert switched[-1] == ("w0", "mixed", "planner")

    asyncio.run(main())


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError):
        PlannerConfig(slo_ttft_ms=0, slo_tpot_ms=100)
    with pytest.raises(ConfigError):
        PlannerConfig(slo_ttft_ms=100, slo_tpot_ms=100, hysteresis=1.5)


def test_sim_rates_come_from_the_simulator_on_a_profile_and_are_cached(tmp_path):
    from pdserve.sim.rates import SimRates
    from tests.sim.builders import make_profile

    path = tmp_path / "profile.json"
    make_profile().save(path)
    rates = SimRates(str(path), in_subprocess=False)
    fc = Forecast(rate=5.0, mix=((200, 20),) * 10)
    first = rates(fc, CONFIG)
    assert first.prefill > 0 and first.decode > 0 and first.mixed > 0
    assert rates(Forecast(rate=9.0, mix=((210, 20),) * 10), CONFIG) is first  # same signature
    tight = PlannerConfig(slo_ttft_ms=1000, slo_tpot_ms=10, interval_s=10, window_s=30)
    assert rates(fc, tight) is not first  # another SLO is another measurement


def test_sim_rates_send_distinct_prompts_so_prefill_costs_what_the_profile_says(tmp_path):
    """Identical prompts would hit the simulated prefix cache and prefill for free."""
    from pdserve.sim.cost_model import StepShape
    from pdserve.sim.rates import SimRates
    from tests.sim.builders import make_profile

    path = tmp_path / "profile.json"
    profile = make_profile()
    profile.save(path)
    # The fastest prefill the cost model allows: 512-token prompts in batches of 64.
    one_prompt_s = profile.cost(1).seconds(StepShape(512 * 64, 64, 64 * 512 * 512, 0)) / 64
    slo = PlannerConfig(slo_ttft_ms=1000, slo_tpot_ms=1000, interval_s=10, window_s=30)
    rates = SimRates(str(path))  # in a child process, as the router runs it
    found = rates(Forecast(rate=5.0, mix=((512, 4),) * 10), slo)
    # Within the TTFT's slack of that (identical prompts measured ~25x more).
    assert 0 < found.prefill <= 1.2 / one_prompt_s


def test_serve_config_checks_the_planner_settings(tmp_path):
    from pdserve.serve import ServeConfig

    assert ServeConfig().planner_config() is None
    with pytest.raises(ConfigError, match="planner"):
        ServeConfig(planner="magic")
    with pytest.raises(ConfigError, match="slo_ttft_ms"):
        ServeConfig(planner="slo", slo_tpot_ms=100, planner_profile="p.json")
    with pytest.raises(ConfigError, match="does not exist"):
        ServeConfig(
            planner="slo", slo_ttft_ms=1, slo_tpot_ms=1, planner_profile=str(tmp_path / "x")
        )
    (tmp_path / "p.json").write_text("{}")
    config = ServeConfig(
        planner="slo", slo_ttft_ms=500, slo_tpot_ms=50, planner_profile=str(tmp_path / "p.json")
    )
    assert (config.planner_config().slo_ttft_ms, config.planner_config().cooldown_s) == (500, 60.0)


def test_sim_rates_are_kept_in_a_cache_file_across_restarts(tmp_path):
    from pdserve.sim.rates import SimRates
    from tests.sim.builders import make_profile

    profile, cache = tmp_path / "profile.json", tmp_path / "rates.json"
    make_profile().save(profile)
    fc = Forecast(rate=5.0, mix=((200, 20),) * 10)
    first = SimRates(str(profile), in_subprocess=False, cache_path=str(cache))(fc, CONFIG)
    profile.unlink()  # a second instance can no longer simulate: it must read the file
    again = SimRates(str(profile), in_subprocess=False, cache_path=str(cache))
    assert again(fc, CONFIG) == first
    other = SimRates(str(profile), threads_per_worker=2, cache_path=str(cache))
    assert other.cache == {}  # rates of another worker size are not reused
