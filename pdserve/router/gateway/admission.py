"""SLO-aware admission: refuse at once (429) what would miss its TTFT target anyway.

Owns: the ledger of admitted requests still waiting for their first token (by priority),
the model that turns queued prompt tokens into a predicted TTFT, and the queue cap.

Prediction (Mooncake's Conductor rejects early in the same spirit): a new request of `w`
prompt tokens (prompt x n, summed over its prompts) with priority `p` waits behind every
queued token of priority <= p (the engines schedule lower values first), plus queued
tokens the serving system reports that this ledger does not know of (another router's
requests: `EngineClient.queued_prefill_tokens`). Its TTFT is predicted as
`base + (ahead + w) / rate`, where `base` and `rate` are fitted (least squares with
exponential forgetting) to the TTFTs this router measured: each admitted request
contributes (its `ahead + w` at admission, its measured TTFT) when its first token
arrives. The fit therefore absorbs everything on the path, routing, KV hand-over, decode
steps interleaved with prefill, in the units that matter: the TTFT clients see. Until
enough samples exist, `admission_prefill_tokens_per_s` is the rate. A fit lags the load
it learns from (a TTFT is known only when it has passed), so each prediction is also
scaled by the 90th percentile of the last `NUM_RATIOS` measured/predicted ratios: when
the last requests took 20 % longer than predicted, the next prediction is 20 % longer.

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

MIN_SAMPLES = 4.0  # (decayed) samples before the fit replaces the prior rate
DECAY = 0.98  # per sample: the fit follows the last ~50 requests
NUM_RATIOS = 64  # measured/predicted TTFT ratios kept for the correction
MIN_RATIOS = 8  # ratios before the correction applies
RATIO_QUANTILE = 0.9


class TtftModel:
    """TTFT = base + work / rate, fitted by exponentially weighted least squares."""

    def __init__(self, prior_tokens_per_s: float, decay: float = DECAY) -> None:
        self.prior_tokens_per_s = prior_tokens_per_s
        self.decay = decay
        self.n = self.sw = self.st = self.sww = self.swt = 0.0

    def observe(self, work_tokens: float, ttft_s: float) -> None:
        d = self.decay
        self.n = self.n * d + 1
        self.sw = self.sw * d + work_tokens
        self.st = self.st * d + ttft_s
        self.sww = self.sww * d + work_tokens * work_tokens
        self.swt = self.swt * d + work_tokens * ttft_s

    def coefficients(self) -> tuple[float, float]:
        """(base seconds, seconds per token)."""
        if self.n < MIN_SAMPLES:
            return 0.0, 1.0 / self.prior_tokens_per_s
        mean_w, mean_t = self.sw / self.n, self.st / self.n
        var_w = self.sww / self.n - mean_w * mean_w
        if var_w > 1.0:  # the works differ enough to separate base from rate
            slope = (self.swt / self.n - mean_w * mean_t) / var_w
            if slope > 0:
                return max(0.0, mean_t - slope * mean_w), slope
        # All works alike (or TTFT not growing with work): the mean time per token.
        return 0.0, self.st / max(self.sw, 1.0)

    def predict(self, work_tokens: float) -> float:
        base, per_token = self.coefficients()
        return base + work_tokens * per_token

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.coefficients()[1]


@dataclass(eq=False)
class Ticket:
    """One admitted request until its first token (or its end)."""

    request_id: str
    priority: int
    num_tokens: int  # prompt tokens x n still counted in the queue
    work: int  # tokens ahead of it at admission + its own: the TTFT model's input
    admitted_at: float
    predicted_s: float  # the model's TTFT at admission, before the correction
    is_queued: bool = True
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
        self._ratios: deque[float] = deque(maxlen=NUM_RATIOS)
        self.queued_elsewhere = queued_elsewhere
        self.clock = clock
        self._tokens: dict[int, int] = {}  # priority -> queued tokens
        self._queued: dict[int, dict[str, Ticket]] = {}  # priority -> tickets, oldest first
        self.num_queued = 0

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

    def admit(self, request_id: str, num_tokens: int, priority: int = 0) -> Ticket:
        """A ticket for the request, or `RateLimitedError` (code `queue_full` or
        `ttft_unattainable`). Evicts a queued lower-priority request when the queue is full."""
        victim = None
        if self.max_queued is not None and self.num_queued >= self.max_queued:
            victim = self._victim(priority)
            if victim is None:
                raise RateLimitedError(
                    f"the server has {self.num_queued} requests waiting for their first "
                    f"token (max_queued_requests {self.max_queued}); retry later",
                    self.model.predict(self.num_queued_tokens) * self.correction,
                    type="overloaded",
                    code="queue_full",
                )
        ahead = self.tokens_ahead(priority)
        raw = self.model.predict(ahead + num_tokens)
        if self.target_s is not None and ahead > 0:
            predicted = raw * self.correction
            if predicted > self.target_s:
                raise RateLimitedError(
                    f"the server cannot start this request within its TTFT target of "
                    f"{self.target_s * 1000:.0f} ms now (predicted {predicted * 1000:.0f} ms); "
                    "retry later",
                    predicted - self.target_s,
                    type="overloaded",
                    code="ttft_unattainable",
                )
        if victim is not None:
            self.evict(victim)
        ticket = Ticket(request_id, priority, num_tokens, ahead + num_tokens, self.clock(), raw)
        self._tokens[priority] = self._tokens.get(priority, 0) + num_tokens
        self._queued.setdefault(priority, {})[request_id] = ticket
        self.num_queued += 1
        return ticket

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
            ttft = self.clock() - ticket.admitted_at
            self.model.observe(ticket.work, ttft)
            if ticket.predicted_s > 0:
                self._ratios.append(ttft / ticket.predicted_s)

    @property
    def correction(self) -> float:
        """How much longer than the fit's predictions TTFTs have lately been (a high
        quantile, so that most accepted requests meet the target); 1 until measured."""
        if len(self._ratios) < MIN_RATIOS:
            return 1.0
        ordered = sorted(self._ratios)
        return ordered[min(len(ordered) - 1, int(RATIO_QUANTILE * len(ordered)))]

    def release(self, ticket: Ticket) -> None:
        """The request ended (any way); idempotent."""
        self._dequeue(ticket)

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
        return max(1.0, math.ceil(self.model.predict(self.num_queued_tokens) * self.correction))
