"""SLO-aware admission: refuse at once (429) what would miss its TTFT target anyway.

Owns: the ledger of admitted requests still waiting for their first token (by priority),
the model that turns queued prompt tokens into a predicted TTFT, and the queue cap.

Prediction (Mooncake's Conductor rejects early in the same spirit): a new request of `w`
prompt tokens (prompt x n, summed over its prompts) with priority `p` waits behind every
queued token of priority <= p (the engines schedule lower values first), plus queued
tokens the serving system reports that this ledger does not know of (another router's
requests: `EngineClient.queued_prefill_tokens`). Its TTFT is predicted from that work
(`ahead + w`) and the sequences this router has decoding at the moment
(`gateway/ttft_model.py`: `base + per_token x work + per_sequence x decoding`, fitted by
least squares with exponential forgetting to the TTFTs this router measured: each
admitted request contributes its inputs at admission and its measured TTFT when its
first token arrives). The fit therefore absorbs everything on the path, routing, KV hand-over, decode
steps interleaved with prefill, in the units that matter: the TTFT clients see. Until
enough samples exist, `admission_prefill_tokens_per_s` is the rate. A fit lags the load
it learns from (a TTFT is known only when it has passed), so each prediction is also
scaled by the 90th percentile of the last `NUM_RATIOS` measured/predicted ratios: when
the last requests took 20 % longer than predicted, the next prediction is 20 % longer.
Only predictions of a fitted model count (not of the prior, whose errors say nothing
about the fit), and only those of the last `RATIO_MAX_AGE_S` seconds: a correction
learned under one load must not keep refusing requests once it has passed (refusing
leaves fewer first tokens to learn from).
Requests still queued count too, as lower bounds: one waiting 1.5x its prediction already
says the host is slower now than the measured ratios know (`Admission.overdue`).

Decisions, in order, when a request arrives:
1. `max_queued_requests` reached: the newest queued request of the numerically highest
   priority is evicted (its client gets a 429) if the newcomer's priority is lower,
   else the newcomer is refused. So overload sheds the lowest priority first.
2. With `admission_ttft_ms`: predicted TTFT above the target -> 429 with `Retry-After`
   (the time for the queue ahead to drain down to the target). A request with nothing
   ahead of it is always admitted: waiting cannot make it faster.
Everything here is synchronous and O(number of priorities): a refusal costs microseconds.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.router.gateway.config import GatewayConfig
from pdserve.router.gateway.errors import RateLimitedError
from pdserve.router.gateway.ttft_model import TtftModel

NUM_RATIOS = 64  # measured/predicted TTFT ratios kept for the correction
MIN_RATIOS = 8  # ratios before the correction applies
RATIO_QUANTILE = 0.9
RATIO_MAX_AGE_S = 30.0  # older ratios describe a load that has passed


@dataclass(eq=False)
class Ticket:
    """One admitted request until its first token (or its end)."""

    request_id: str
    priority: int
    num_tokens: int  # prompt tokens x n still counted in the queue
    work: int  # tokens ahead of it at admission + its own: the TTFT model's input
    decoding: int  # sequences decoding at admission: the model's other input
    admitted_at: float
    predicted_s: float | None  # the fitted model's TTFT at admission (None: the prior's)
    num_seqs: int = 1  # sequences it decodes once started (n x prompts)
    is_queued: bool = True
    is_running: bool = False  # started, counted in `num_running`
    is_evicted: bool = False
    on_evict: list[Callable[[], None]] = field(default_factory=list)


class Admission:
    def __init__(
        self,
        config: GatewayConfig,
        queued_elsewhere: Callable[[], int | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_s = config.admission_ttft_ms / 1000 if config.admission_ttft_ms else None
        self.max_queued = config.max_queued_requests
        self.model = TtftModel(config.admission_prefill_tokens_per_s)
        self._ratios: deque[tuple[float, float]] = deque(maxlen=NUM_RATIOS)  # (time, ratio)
        self.queued_elsewhere = queued_elsewhere
        self.clock = clock
        self._tokens: dict[int, int] = {}  # priority -> queued tokens
        self._queued: dict[int, dict[str, Ticket]] = {}  # priority -> tickets, oldest first
        self.num_queued = 0
        self.num_running = 0  # sequences of admitted requests past their first token

    @property
    def is_active(self) -> bool:
        return self.target_s is not None or self.max_queued is not None

    @property
    def num_queued_tokens(self) -> int:
        return sum(self._tokens.values())

    def tokens_ahead(self, priority: int) -> int:
        mine = sum(t for p, t in self._tokens.items() if p <= priority)
        reported = self.queued_elsewhere()
        unknown = max(0, reported - self.num_queued_tokens) if reported is not None else 0
        return mine + unknown

    def admit(
        self, request_id: str, num_tokens: int, priority: int = 0, num_seqs: int = 1
    ) -> Ticket:
        """A ticket for the request, or `RateLimitedError` (code `queue_full` or
        `ttft_unattainable`). Evicts a queued lower-priority request when the queue is full."""
        refusal, victim, ahead, raw = self._decide(num_tokens, priority)
        if refusal is not None:
            raise refusal
        if victim is not None:
            self.evict(victim)
        fitted = raw if self.model.is_fitted else None
        ticket = Ticket(
            request_id,
            priority,
            num_tokens,
            ahead + num_tokens,
            self.num_running,
            self.clock(),
            fitted,
            num_seqs,
        )
        self._tokens[priority] = self._tokens.get(priority, 0) + num_tokens
        self._queued.setdefault(priority, {})[request_id] = ticket
        self.num_queued += 1
        return ticket

    def refuse_early(self, priority: int = 0, num_tokens: int = 1) -> RateLimitedError | None:
        """The refusal any request of `priority` with at least `num_tokens` queued prompt
        tokens would get now (more tokens only predict a later first token), or None.
        Decided from the queue and that floor alone, so the HTTP edge can answer before
        parsing a body (`gateway/edge.py`); it changes nothing."""
        if not self.is_active:
            return None
        return self._decide(num_tokens, priority)[0]

    def _decide(
        self, num_tokens: int, priority: int
    ) -> tuple[RateLimitedError | None, Ticket | None, int, float]:
        """(refusal, victim to evict, tokens ahead, the model's raw TTFT prediction)."""
        victim = None
        if self.max_queued is not None and self.num_queued >= self.max_queued:
            victim = self._victim(priority)
            if victim is None:
                refusal = RateLimitedError(
                    f"the server has {self.num_queued} requests waiting for their first "
                    f"token (max_queued_requests {self.max_queued}); retry later",
                    self.retry_after_hint(),
                    type="overloaded",
                    code="queue_full",
                )
                return refusal, None, 0, 0.0
        ahead = self.tokens_ahead(priority)
        raw = self.model.predict(ahead + num_tokens, self.num_running)
        if self.target_s is not None and ahead > 0:
            predicted = raw * self.correction_for(priority)
            if predicted > self.target_s:
                refusal = RateLimitedError(
                    f"the server cannot start this request within its TTFT target of "
                    f"{self.target_s * 1000:.0f} ms now (predicted {predicted * 1000:.0f} ms); "
                    "retry later",
                    predicted - self.target_s,
                    type="overloaded",
                    code="ttft_unattainable",
                )
                return refusal, None, ahead, raw
        return None, victim, ahead, raw

    def _victim(self, priority: int) -> Ticket | None:
        worst = max(self._queued, default=None)
        if worst is None or worst <= priority:
            return None
        return next(reversed(self._queued[worst].values()))  # the newest of the worst

    def evict(self, ticket: Ticket) -> None:
        """Drop a queued request from the ledger and tell its generation to stop."""
        self._dequeue(ticket)
        ticket.is_evicted = True
        for callback in ticket.on_evict:
            callback()

    def started(self, ticket: Ticket, num_tokens: int | None = None) -> None:
        """`num_tokens` of the ticket's prompts have their first token (None: all of
        them). When all have, the measured TTFT feeds the model."""
        if not ticket.is_queued:
            return
        done = ticket.num_tokens if num_tokens is None else min(num_tokens, ticket.num_tokens)
        ticket.num_tokens -= done
        self._take(ticket.priority, done)
        if ticket.num_tokens == 0:
            self._dequeue(ticket)
            ticket.is_running = True
            self.num_running += ticket.num_seqs
            now = self.clock()
            ttft = now - ticket.admitted_at
            self.model.observe(ticket.work, ttft, ticket.decoding)
            if ticket.predicted_s:
                self._ratios.append((now, ttft / ticket.predicted_s))

    @property
    def correction(self) -> float:
        """`correction_for` a request behind everything queued."""
        return self.correction_for(None)

    def correction_for(self, priority: int | None) -> float:
        """How much longer than the fit's predictions TTFTs of a request of `priority`
        are lately: a high quantile of the measured ratios (so that most accepted
        requests meet the target), 1 until measured, raised to what a request it would
        wait behind, still queued, already shows (`overdue`)."""
        now = self.clock()
        while self._ratios and now - self._ratios[0][0] > RATIO_MAX_AGE_S:
            self._ratios.popleft()
        measured = 1.0
        if len(self._ratios) >= MIN_RATIOS:
            ordered = sorted(ratio for _, ratio in self._ratios)
            measured = ordered[min(len(ordered) - 1, int(RATIO_QUANTILE * len(ordered)))]
        return max(measured, self.overdue(now, priority))

    def overdue(self, now: float, priority: int | None = None) -> float:
        """The largest elapsed / predicted of the oldest queued request of each priority
        <= `priority` (None: all; fitted predictions, admitted within `RATIO_MAX_AGE_S`),
        or 0.

        Why: a TTFT is measured only once it has passed, so when the host slows down
        (other work takes its cores) the measured ratios learn it one TTFT late, and
        requests admitted meanwhile miss the target. A request still waiting longer than
        predicted is evidence now: its ratio will be at least elapsed / predicted. Only
        priorities a newcomer waits behind count: a less important request overtaken by
        more important ones is late for a reason that does not delay those. The oldest
        of each priority is checked (O(priorities) per decision: a burst's refusals pay
        it each)."""
        worst = 0.0
        for queued_priority, queue in self._queued.items():
            if priority is not None and queued_priority > priority:
                continue
            oldest = next(iter(queue.values()))
            elapsed = now - oldest.admitted_at
            if oldest.predicted_s and elapsed <= RATIO_MAX_AGE_S:
                worst = max(worst, elapsed / oldest.predicted_s)
        return worst

    def release(self, ticket: Ticket) -> None:
        """The request ended (any way); idempotent."""
        self._dequeue(ticket)
        if ticket.is_running:
            ticket.is_running = False
            self.num_running -= ticket.num_seqs

    def _dequeue(self, ticket: Ticket) -> None:
        if not ticket.is_queued:
            return
        ticket.is_queued = False
        self._take(ticket.priority, ticket.num_tokens)
        queue = self._queued[ticket.priority]
        del queue[ticket.request_id]
        if not queue:
            del self._queued[ticket.priority]
        self.num_queued -= 1

    def _take(self, priority: int, tokens: int) -> None:
        left = self._tokens.get(priority, 0) - tokens
        if left > 0:
            self._tokens[priority] = left
        else:
            self._tokens.pop(priority, None)

    def retry_after_hint(self) -> float:
        """Seconds for the current queue to drain (for a 503 with nothing better)."""
        predicted = self.model.predict(self.num_queued_tokens, self.num_running)
        return max(1.0, math.ceil(predicted * self.correction))
