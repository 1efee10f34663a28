"""`Gateway`: the checks a request passes at the HTTP edge, and the `Lease` it holds.

Order of one request through the gateway (each step refuses before the next costs more):

    authenticate (401)  ->  key: requests/minute and concurrency (429)
    -> body read under the size cap (413) -> parse + limits (400)   [router/app.py]
    -> tokenise (off the loop when large)                           [router/serving.py]
    -> key: tokens/minute (429) -> admission: queue cap, TTFT (429)
    -> generation, under its deadline (408) and until evicted (429)

A `Lease` is what an accepted request holds: its key's concurrency slot and token
charge, its admission ticket and its deadline. `close()` gives back whatever the request
did not use; it is idempotent, and called by the generation when it ends and by the route
on every error, so no exit path leaks a slot.
"""

from __future__ import annotations

import time
from typing import Any

from pdserve.errors import InvalidRequestError
from pdserve.router.gateway import keys as k
from pdserve.router.gateway.admission import Admission, Ticket
from pdserve.router.gateway.config import GatewayConfig
from pdserve.router.gateway.errors import (
    DeadlineExceededError,
    PayloadTooLargeError,
    RateLimitedError,
)
from pdserve.router.gateway.limits import (
    check_limits,
    check_unsupported,
    max_prompt_bytes,
    max_token_bytes,
)
from pdserve.router.gateway.metrics import NO_KEY, GatewayMetrics


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        client: Any,  # router.client.EngineClient
        registry: Any,  # the router's prometheus CollectorRegistry
    ) -> None:
        self.config = config
        self.keys = k.KeyRing.build(config.api_key, config.api_keys_file)
        self.admission = Admission(config, client.queued_prefill_tokens)
        self.metrics = GatewayMetrics(registry, self.admission)
        self.token_bytes = max_token_bytes(client.tokenizer)  # the longest token's UTF-8
        self.max_prompt_bytes = max_prompt_bytes(config, self.token_bytes, client.max_model_len)

    def authenticate(self, token: str | None) -> k.ApiKey | None:
        """The key a bearer token belongs to; None when keys are off. Raises `LookupError`
        for a missing or wrong token (the app answers 401)."""
        try:
            return self.lookup(token)
        except LookupError:
            self.metrics.rejected.labels("unauthorized").inc()
            raise

    def lookup(self, token: str | None) -> k.ApiKey | None:
        """`authenticate` without counting a refusal (the edge's first look)."""
        if self.keys is None:
            return None
        key = self.keys.authenticate(token) if token is not None else None
        if key is None:
            raise LookupError("no key" if token is None else "wrong key")
        return key

    def open(self, key: k.ApiKey | None) -> Lease:
        """Start a request for `key`; `RateLimitedError` over its requests or concurrency."""
        name = key.name if key is not None else NO_KEY
        self.metrics.key_requests.labels(name).inc()
        if key is not None:
            refusal = k.take_request(key)
            if refusal is not None:
                raise self._refused(key, refusal)
        return Lease(self, key)

    def check(self, body: Any) -> None:
        """Limits and unsupported fields of a parsed body (400)."""
        check_unsupported(body.model_extra)
        check_limits(body, self.config, self.max_prompt_bytes)

    def note_refusal(self, exc: BaseException) -> None:
        """Count a request the edge refused (`pdserve:requests_rejected_total`)."""
        if isinstance(exc, PayloadTooLargeError):
            reason = "body_too_large"
        elif isinstance(exc, InvalidRequestError) or getattr(exc, "status_code", 0) == 400:
            reason = "invalid"
        elif isinstance(exc, RateLimitedError) and exc.code != "evicted":
            reason = exc.code  # evictions and deadlines are counted where they happen
        else:
            return
        self.metrics.rejected.labels(reason).inc()

    def _refused(self, key: k.ApiKey, refusal: k.QuotaRefusal) -> RateLimitedError:
        self.metrics.key_rate_limited.labels(key.name, refusal.limit).inc()
        kind = "tokens" if refusal.limit == "tokens" else "requests"
        return RateLimitedError(
            refusal.message, refusal.retry_after_s, kind, headers=k.rate_limit_headers(key)
        )


class Lease:
    """One accepted request's hold on its key, its admission ticket and its deadline."""

    def __init__(self, gateway: Gateway, key: k.ApiKey | None) -> None:
        self.gateway = gateway
        self.key = key
        self.ticket: Ticket | None = None
        self.deadline: float | None = None  # time.monotonic() seconds
        self._num_charged_tokens = 0
        self._is_closed = False

    @property
    def headers(self) -> dict[str, str]:
        """The `x-ratelimit-*` headers for the response."""
        return k.rate_limit_headers(self.key) if self.key is not None else {}

    def set_deadline(self, timeout_s: float | None, arrival: float) -> None:
        timeout_s = timeout_s if timeout_s is not None else self.gateway.config.request_timeout_s
        self.deadline = arrival + timeout_s if timeout_s is not None else None

    def charge(self, num_tokens: int) -> None:
        """Take the request's worst-case tokens (prompt + max_tokens x n) from the key."""
        if self.key is None:
            return
        refusal = k.take_tokens(self.key, num_tokens)
        if refusal is not None:
            raise self.gateway._refused(self.key, refusal)
        self._num_charged_tokens = num_tokens

    def admit(
        self, request_id: str, num_prompt_tokens: int, priority: int, num_seqs: int = 1
    ) -> None:
        """Pass admission (`RateLimitedError` if refused)."""
        admission = self.gateway.admission
        if not admission.is_active:
            return
        self.ticket = admission.admit(request_id, num_prompt_tokens, priority, num_seqs)

    def started(self, num_tokens: int | None = None) -> None:
        if self.ticket is not None:
            self.gateway.admission.started(self.ticket, num_tokens)

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> Exception:
        """The error for a generation stopped by its deadline or by eviction."""
        if self.ticket is not None and self.ticket.is_evicted:
            self.gateway.metrics.rejected.labels("evicted").inc()
            return RateLimitedError(
                "the server is overloaded and gave this request's place in the queue to one "
                "of higher priority; retry later",
                self.gateway.admission.retry_after_hint(),
                type="overloaded",
                code="evicted",
            )
        self.gateway.metrics.rejected.labels("deadline").inc()
        return DeadlineExceededError("the request did not finish before its deadline")

    def close(self, num_prompt_tokens: int = 0, num_completion_tokens: int = 0) -> None:
        """End the request: release the ticket and the slot, refund unused tokens."""
        if self._is_closed:
            return
        self._is_closed = True
        if self.ticket is not None:
            self.gateway.admission.release(self.ticket)
        if self.key is None:
            name = NO_KEY
        else:
            name = self.key.name
            used = num_prompt_tokens + num_completion_tokens
            k.end_request(self.key, self._num_charged_tokens - used)
        metrics = self.gateway.metrics
        if num_prompt_tokens:  # a refused request has none: skip the label look-ups
            metrics.key_prompt_tokens.labels(name).inc(num_prompt_tokens)
        if num_completion_tokens:
            metrics.key_generation_tokens.labels(name).inc(num_completion_tokens)
