"""The SLO planner: roles that follow the load (observe → predict → propose → reconcile).

Dynamo's planner loop, with roles instead of replica counts and the simulator's cost model
instead of hand-set thresholds:

1. **Observe** (`RequestLog`): every request's arrival time, prompt tokens and output
   budget (or the client's `expected_output_tokens` hint), as the router admits it.
2. **Predict** (`forecast`): the arrival rate of the next interval (an exponentially
   weighted mean of recent windows) and the recent length and class mix (the requests of
   the last `mix_window_s`, or only those since the lengths clearly changed,
   `shift_point`); the output length is the client's hint where it gave one.
3. **Propose** (`propose`): for every assignment of the cluster's workers to roles
   (p prefill, d decode, m mixed), the goodput it would sustain for that mix under the
   SLOs — `min(rate, min(p x prefill, d x decode) + m x mixed)`, DistServe's placement
   rule over one worker's goodput per role (a `RateModel`; `sim/rates.py`'s `SimRates`
   measures those with the simulator on the `pdserve profile` cost model, the one cost
   model the planner and the simulator share).
   Contention: workers sharing a host's cores slow each other (sim/sharing.py), so a
   rate model may also give each role's rate beside a worker that is always busy
   (`RoleRates.*_busy`); a worker's rate in a layout is between the two, by how busy the
   other workers are at the layout's capacity (`Layout.capacity`). (Measured on 2 cores:
   without this term the planner preferred two mixed workers where 1P + 1D had won.)
   In `auto` mode a layout is rated as what it serves as (`Layout.serving`).
   When the current layout misses its SLOs, the rates are first scaled to what it
   delivers (control/calibration.py): the profile gives the layouts' relative merits,
   the cluster's observed goodput their level; and what layouts delivered when they
   were saturated, or while they met their SLOs, overrides the model for them, so a
   wrong relative merit is found out by trying the other layout once.
4. **Reconcile** (`decide`, `moves`): switch only when the best layout beats the current
   one's predicted goodput by `hysteresis` (10 %), one worker at a time (the
   drain-and-switch of router/elastic.py), and start a new transition at most once per
   `cooldown_s`, so noise never makes it flap. The moves of a transition already decided
   (2 mixed -> 1 prefill + 1 decode is two moves) follow each other pass by pass without
   waiting for the cooldown, while the target stays the best layout.

Workload classes: a request may name its SLO class (`slo_class`; `PlannerConfig.classes`
from `slo_classes` in the serve YAML, the CLI's `--slo-*` being the default class). The
forecast keeps each request's class, and `class_rates` asks the rate model for each
class's mix under that class's SLO, then blends the per-role rates by the classes'
shares of the mix (a worker time-shares them: 1 / sum(share / rate)).

Everything here is plain arithmetic on plain data, torch-free and simulator-free (the
rate model is passed in), so the simulator can run the same decisions offline and tests
can check them exactly. `planner_loop.py` runs them beside the router.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.errors import ConfigError

ROLES = ("prefill", "decode", "mixed")
DEFAULT_CLASS = "default"
MIN_MIX = 16  # requests the forecast's mix holds at least, when the history has them
# A move must gain at least this many requests meeting their SLO per `mix_window_s`
# (besides `hysteresis`): fewer are within the counting noise of the evidence.
MIN_GAIN_REQUESTS = 2.0


@dataclass(frozen=True)
class PlannerConfig:
    slo_ttft_ms: float
    slo_tpot_ms: float
    interval_s: float = 10.0  # one observe → reconcile pass
    window_s: float = 60.0  # history the rate forecast reads
    mix_window_s: float = 20.0  # history the length/class mix is read from (at least MIN_MIX)
    cooldown_s: float = 60.0  # between two switches
    hysteresis: float = 0.1  # the best layout must beat the current one by this share
    smoothing: float = 0.5  # weight of the newest window in the rate forecast
    # The cluster runs in `auto` mode: roles serve as `Layout.serving` says (a decode
    # worker with nothing to hand prompts to prefills them itself, and so on).
    local_prefill: bool = False

    # Per workload class SLOs: (name, ttft_ms, tpot_ms); a request names its class in the
    # `slo_class` body field, and a request of no (or an unknown) class gets the default
    # (control/slo_classes.py: parsing, and rating a mix of classes).
    classes: tuple[tuple[str, float, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("slo_ttft_ms", "slo_tpot_ms", "interval_s", "window_s", "mix_window_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
        if not 0 <= self.hysteresis < 1 or not 0 < self.smoothing <= 1:
            raise ConfigError("hysteresis", "hysteresis in [0, 1), smoothing in (0, 1]")
        for name, ttft, tpot in self.classes:
            if name == DEFAULT_CLASS or not isinstance(name, str) or not name:
                raise ConfigError("slo_classes", f"{name!r} is not a class name")
            if not (ttft > 0 and tpot > 0 and math.isfinite(ttft) and math.isfinite(tpot)):
                raise ConfigError(f"slo_classes.{name}", "ttft_ms and tpot_ms must be > 0")

    def class_of(self, slo_class: str | None) -> str:
        """The class a request is planned in: its own when configured, else the default."""
        known = slo_class is not None and any(c[0] == slo_class for c in self.classes)
        return slo_class if known else DEFAULT_CLASS  # type: ignore[return-value]

    def for_class(self, name: str) -> PlannerConfig:
        """This config with the class's SLO as its SLO (what a rate model reads)."""
        for cls, ttft, tpot in self.classes:
            if cls == name:
                return dataclasses.replace(self, slo_ttft_ms=ttft, slo_tpot_ms=tpot)
        return self


@dataclass(frozen=True, slots=True)
class Arrival:
    time: float
    prompt_tokens: int
    output_tokens: int  # the budget, or the client's expected_output_tokens hint
    slo_class: str | None = None  # the request's `slo_class`, as sent


@dataclass(frozen=True, slots=True)
class Outcome:
    time: float  # when the request finished
    slo_class: str | None
    ttft_s: float | None  # None: it failed before its first token
    tpot_s: float | None  # None: fewer than two tokens
    arrival: float | None = None  # when it was admitted


class RequestLog:
    """What the router admitted recently (it calls `record` per request) and how the
    finished ones did (`record_outcome`, for control/calibration.py)."""

    def __init__(self, keep_s: float = 600.0) -> None:
        self.keep_s = keep_s
        self.arrivals: deque[Arrival] = deque()
        self.outcomes: deque[Outcome] = deque()
        self.started: float | None = None  # the first admission ever: no evidence before it

    def record_outcome(
        self,
        ttft_s: float | None,
        tpot_s: float | None,
        slo_class: str | None = None,
        now: float | None = None,
        arrival: float | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now
        self.outcomes.append(Outcome(now, slo_class, ttft_s, tpot_s, arrival))
        while self.outcomes and self.outcomes[0].time < now - self.keep_s:
            self.outcomes.popleft()

    def record(
        self,
        prompt_tokens: int,
        output_tokens: int,
        now: float | None = None,
        slo_class: str | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now
        self.started = now if self.started is None else min(self.started, now)
        self.arrivals.append(Arrival(now, prompt_tokens, output_tokens, slo_class))
        while self.arrivals and self.arrivals[0].time < now - self.keep_s:
            self.arrivals.popleft()


@dataclass(frozen=True)
class Forecast:
    rate: float  # requests/s expected next interval
    mix: tuple[tuple[int, int], ...]  # (prompt tokens, output tokens) of recent requests
    classes: tuple[str, ...] = ()  # the planning class of each request of `mix` (or none)
    # When the traffic changed (`shift_point`): the admission time of the first request of
    # `mix`; outcomes of requests admitted before it describe the old traffic.
    since: float | None = None

    @property
    def signature(self) -> tuple[int, int]:
        """The mix, coarsely (mean prompt, mean output rounded to 2 significant bits):
        rates measured for one signature serve every mix close to it."""
        if not self.mix:
            return (0, 0)
        prompt = sum(p for p, _ in self.mix) / len(self.mix)
        output = sum(o for _, o in self.mix) / len(self.mix)
        return (_coarse(prompt), _coarse(output))


def _coarse(x: float) -> int:
    if x < 4:
        return round(x)
    step = 2 ** (math.floor(math.log2(x)) - 1)
    return int(round(x / step) * step)


def forecast(log: RequestLog, config: PlannerConfig, now: float, max_mix: int = 200) -> Forecast:
    """Rate: an exponentially weighted mean over the windows of `interval_s` within
    `window_s`, newest weighted `smoothing`; mix: the requests of the last `mix_window_s`
    (at most the latest `max_mix`; at least the latest `MIN_MIX` of `window_s`), so a
    change of traffic shows in the mix within seconds, not once a minute of older
    requests has aged out. When the newest requests' lengths differ clearly from the
    older ones' (`shift_point`), the mix and the rate are theirs alone: 8 long prompts
    after `code` are a long-prompt phase, not a `code` mix with some long prompts in it
    until the 20 s window has emptied (measured: switches 16-20 s into the phase)."""
    arrivals = [a for a in log.arrivals if now - config.window_s < a.time <= now]
    num_windows = max(1, int(config.window_s // config.interval_s))
    counts = [0] * num_windows
    for a in arrivals:
        age = int((now - a.time) // config.interval_s)
        if age < num_windows:
            counts[age] += 1
    rate, weight = 0.0, 0.0
    for age, count in enumerate(counts):
        w = config.smoothing * (1 - config.smoothing) ** age
        rate += w * count / config.interval_s
        weight += w
    rate /= weight
    recent = [a for a in arrivals if a.time > now - config.mix_window_s][-max_mix:]
    if len(recent) < MIN_MIX:
        recent = arrivals[-MIN_MIX:]
    start, since = shift_point(recent), None
    if start is not None:  # the traffic changed: what came before describes the past
        recent = recent[start:]
        since = recent[0].time
        rate = (len(recent) - 1) / max(recent[-1].time - since, 1e-3)
    mix = tuple((a.prompt_tokens, a.output_tokens) for a in recent)
    return Forecast(rate, mix, tuple(config.class_of(a.slo_class) for a in recent), since)


# A change of traffic (`shift_point`): the newest SHIFT_MIN or more requests whose prompt or
# output lengths differ from the older ones' by SHIFT_RATIO in geometric mean, at SHIFT_T
# standard errors (Welch's t on log lengths). Both, and a high t, because the test is made
# at every split point of a window of up to 200 requests: on a steady `chat` mix (prompt
# lengths lognormal, sigma 1.0) t > 4 found a "change" in 3 % of windows, t > 6 in 0.2 %.
# A switch to 1024-token prompts from `code` is 16x and tens of standard errors: it is
# seen after 8 requests instead of once the 20 s window has aged out.
SHIFT_MIN = 8
SHIFT_RATIO = 2.0
SHIFT_T = 6.0
_VAR_FLOOR = 0.01  # log-length variance of a constant-length mix (no division by zero)


def shift_point(arrivals: list[Arrival]) -> int | None:
    """Where the traffic of `arrivals` (oldest first) last changed its length mix: the
    index of the first request of the changed traffic, or None when it did not change.
    Of the split points that pass both tests (constants above), the one with the
    largest t statistic: the likeliest change point."""
    n = len(arrivals)
    if n < 2 * SHIFT_MIN:
        return None
    best, best_t = None, SHIFT_T
    for values in (
        [math.log1p(a.prompt_tokens) for a in arrivals],
        [math.log1p(a.output_tokens) for a in arrivals],
    ):
        sums, squares = [0.0], [0.0]
        for v in values:
            sums.append(sums[-1] + v)
            squares.append(squares[-1] + v * v)
        for k in range(SHIFT_MIN, n - SHIFT_MIN + 1):  # k: the newest k requests
            split = n - k
            m_old, m_new = sums[split] / split, (sums[n] - sums[split]) / k
            v_old = max(squares[split] / split - m_old**2, _VAR_FLOOR)
            v_new = max((squares[n] - squares[split]) / k - m_new**2, _VAR_FLOOR)
            t = abs(m_new - m_old) / math.sqrt(v_old / split + v_new / k)
            if abs(m_new - m_old) >= math.log(SHIFT_RATIO) and t > best_t:
                best, best_t = split, t
    return best


@dataclass(frozen=True, slots=True)
class RoleRates:
    """One worker's goodput (requests/s meeting both SLOs) in each role, for one mix,
    alone and beside a worker that is always busy (None: no contention known)."""

    prefill: float
    decode: float
    mixed: float
    prefill_busy: float | None = None
    decode_busy: float | None = None
    mixed_busy: float | None = None

    def busy(self, role: str) -> float:
        value = getattr(self, role + "_busy")
        return getattr(self, role) if value is None else value

    def scaled(self, factor: float) -> RoleRates:
        """Every rate (alone and busy) times `factor`."""
        return RoleRates(*(None if v is None else v * factor for v in dataclasses.astuple(self)))


CONTENTION_PASSES = 4  # fixed-point passes of `Layout.capacity` (converges in 2-3)


def rate_beside(alone: float, busy: float, neighbour_busy: float) -> float:
    """A worker's rate while its neighbours are busy `neighbour_busy` (0-1) of the time:
    its time per request is the alone and the busy one's, weighted by that share."""
    if alone <= 0 or busy <= 0:
        return 0.0
    if busy == alone:  # no contention known: exactly the alone rate
        return alone
    return 1.0 / ((1.0 - neighbour_busy) / alone + neighbour_busy / busy)


RateModel = Callable[[Forecast, PlannerConfig], RoleRates]


@dataclass(frozen=True, slots=True)
class Layout:
    prefill: int
    decode: int
    mixed: int

    def capacity(self, rates: RoleRates) -> float:
        """DistServe's rule: a P/D split serves what its slower phase can; mixed add up.
        Each role's rate is the one beside the other workers' busy share at that
        capacity (module docstring, contention), found by a few fixed-point passes."""
        counts = self.as_dict()
        num_workers = sum(counts.values())
        rate = {role: getattr(rates, role) for role in ROLES}  # first pass: alone
        total = 0.0
        for _ in range(CONTENTION_PASSES):
            split = min(self.prefill * rate["prefill"], self.decode * rate["decode"])
            if self.prefill == 0 or self.decode == 0:
                split = 0.0
            total = split + self.mixed * rate["mixed"]
            if num_workers < 2:
                break
            use = {  # how busy one worker of each role is at that capacity (0-1)
                "prefill": split / (self.prefill * rate["prefill"]) if split else 0.0,
                "decode": split / (self.decode * rate["decode"]) if split else 0.0,
                "mixed": 1.0 if rate["mixed"] > 0 else 0.0,
            }
            busy_sum = sum(counts[role] * use[role] for role in ROLES)
            for role in ROLES:
                others = (busy_sum - use[role]) / (num_workers - 1) if counts[role] else 0.0
                rate[role] = rate_beside(getattr(rates, role), rates.busy(role), others)
        return total

    def as_dict(self) -> dict[str, int]:
        return {"prefill": self.prefill, "decode": self.decode, "mixed": self.mixed}

    def serving(self, local_prefill: bool) -> Layout:
        """What the router makes of these roles in `auto` mode (`local_prefill`,
        router/policy.py), where it is exact: only prefill workers take prompts for
        others, so without one every worker prefills its own (2D and 1D/1M serve as 2M),
        and beside one a mixed worker is a decode target like a decode worker, prefilling
        short prompts locally (1P/1M serves as 1P/1D). So 2M -> 1P/1D and 1P/1D -> 2M are
        one move each (-> 1P/1M, -> 2D or 1D/1M), one drain. (Without this the planner
        rated roles literally, 1D/1M as one mixed worker beside an idle one, above 2M, and
        stopped a transition there: control/replay.py.)"""
        if not local_prefill:
            return self
        if self.prefill == 0:
            return Layout(0, 0, self.decode + self.mixed)
        if self.decode + self.mixed > 0:
            return Layout(self.prefill, self.decode + self.mixed, 0)
        return self


def layouts(num_workers: int) -> list[Layout]:
    """Every assignment of `num_workers` to roles."""
    return [
        Layout(p, d, num_workers - p - d)
        for p, d in itertools.product(range(num_workers + 1), repeat=2)
        if p + d <= num_workers
    ]


@dataclass(frozen=True)
class Proposal:
    layout: Layout
    predicted_goodput: float


def propose(
    fc: Forecast,
    rates: RoleRates,
    num_workers: int,
    local_prefill: bool = False,
    capacity: Capacity | None = None,
) -> list[Proposal]:
    """Layouts by predicted goodput (of the layout they serve as, `Layout.serving`),
    best first (ties: more mixed workers, the layout that adapts to any mix). A layout
    that serves as prefill workers without decode workers, or the reverse, is never
    proposed: the model rates the lone role idle (and so no contender for the others),
    while a lone decode worker in fact prefills locally and contends like a mixed one
    (measured by the contention term's first offline pass: 1 mixed + 1 idle decode
    rated above 1P + 1D for long prompts). `capacity(serving layout)`: req/s it sustains
    (default: the rate model's; the planner loop passes calibration's judgement)."""
    capacity = capacity or _model_capacity(rates)
    proposals = []
    for layout in layouts(num_workers):
        serving = layout.serving(local_prefill)
        if (serving.prefill == 0) == (serving.decode == 0):
            proposals.append(Proposal(layout, min(fc.rate, capacity(serving))))
    return sorted(
        proposals, key=lambda p: (-p.predicted_goodput, -p.layout.mixed, -p.layout.decode)
    )


Capacity = Callable[[Layout], float]  # a serving layout -> the req/s it sustains


def _model_capacity(rates: RoleRates) -> Capacity:
    return lambda serving: serving.capacity(rates)


@dataclass(frozen=True)
class Decision:
    target: Layout
    predicted_goodput: float
    current_goodput: float
    reason: str
    moves: tuple[tuple[str, str], ...] = ()  # (worker id, new role), done one at a time


def current_layout(roles: dict[str, str]) -> Layout:
    return Layout(*(sum(r == role for r in roles.values()) for role in ROLES))


def decide(
    roles: dict[str, str],
    fc: Forecast,
    rates: RoleRates,
    config: PlannerConfig,
    now: float,
    last_switch: float | None,
    heading: Layout | None = None,
    capacity: Capacity | None = None,
) -> Decision:
    """Whether to change roles now, and which (module docstring, step 4). `heading`: the
    layout of the last decision that moved a worker; its remaining moves are not held
    back by the cooldown (a transition is one decision, not one per worker).
    `capacity`: as `propose`'s."""
    capacity = capacity or _model_capacity(rates)
    current = current_layout(roles)
    current_goodput = min(fc.rate, capacity(current.serving(config.local_prefill)))
    proposals = propose(fc, rates, len(roles), config.local_prefill, capacity)
    top = proposals[0].predicted_goodput
    # Of the layouts that predict the most: the one a transition under way heads for,
    # else the one the fewest moves away (each drains a worker), else `propose`'s order.
    best = min(
        (p for p in proposals if p.predicted_goodput >= top),
        key=lambda p: (p.layout != heading, len(moves(roles, p.layout))),
    )
    gain = best.predicted_goodput - current_goodput
    # The rest of a transition already decided is not held back by the hysteresis
    # either: stopping half-way leaves a layout nobody chose (replay: 1P/1M held for
    # 45 s of a long-prompt phase because the forecast rate fell near its capacity).
    is_continuing = heading is not None and best.layout == heading and gain > 0
    # ... and by a few requests over the window the evidence is counted on: near zero a
    # relative margin is no margin (measured: a host collapsed under another tenant, every
    # layout meeting ~nothing, moved 1P/1M -> 2M on "0.04 vs 0.00 req/s").
    threshold = max(config.hysteresis * current_goodput, MIN_GAIN_REQUESTS / config.mix_window_s)
    if best.layout == current or (gain <= threshold and not is_continuing):
        return Decision(
            current, current_goodput, current_goodput, "hold: current layout within hysteresis"
        )
    if last_switch is not None and now - last_switch < config.cooldown_s and not is_continuing:
        return Decision(current, current_goodput, current_goodput, "hold: cooling down")
    reason = (
        f"{describe_layout(best.layout)} predicts {best.predicted_goodput:.2f} req/s vs "
        f"{current_goodput:.2f} for {describe_layout(current)} at {fc.rate:.2f} req/s"
    )
    return Decision(
        best.layout, best.predicted_goodput, current_goodput, reason, moves(roles, best.layout)
    )


def moves(roles: dict[str, str], target: Layout) -> tuple[tuple[str, str], ...]:
    """The fewest role changes from `roles` to `target` (workers in id order)."""
    want = target.as_dict()
    have = {role: sorted(w for w, r in roles.items() if r == role) for role in ROLES}
    spare = [w for role in ROLES for w in have[role][want[role] :]]
    needed = [role for role in ROLES for _ in range(max(0, want[role] - len(have[role])))]
    return tuple(zip(spare, needed, strict=True))


def describe_layout(layout: Layout) -> str:
    return "/".join(f"{n}{role[0].upper()}" for role, n in layout.as_dict().items() if n)
