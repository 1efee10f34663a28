"""The refusals the gateway raises; `router/serving.py` maps them to HTTP at the boundary.

PdserveError
├── RateLimitedError        429 + Retry-After: a key's quota, the admission queue cap,
│                           or a TTFT target the request would miss
├── DeadlineExceededError   408: the request's deadline passed; it was aborted
└── PayloadTooLargeError    413: the body is over `max_body_bytes`
"""

from __future__ import annotations

import math

from pdserve.errors import PdserveError


class RateLimitedError(PdserveError):
    """Refused for now; worth retrying after `retry_after_s`.

    `type` is OpenAI's error type for the body (`requests` or `tokens` for quotas, as
    OpenAI sends; `overloaded` for admission), `code` its machine-readable reason."""

    def __init__(
        self,
        message: str,
        retry_after_s: float,
        type: str = "requests",
        code: str = "rate_limit_exceeded",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.type = type
        self.code = code
        self.headers = dict(headers or {})

    def response_headers(self) -> dict[str, str]:
        seconds = max(0.001, self.retry_after_s)
        return {
            **self.headers,
            "retry-after": str(max(1, math.ceil(seconds))),  # HTTP: whole seconds
            "retry-after-ms": str(math.ceil(seconds * 1000)),  # OpenAI's finer hint
        }


class DeadlineExceededError(PdserveError):
    """The request's deadline (`timeout` field or `request_timeout_s`) passed."""


class PayloadTooLargeError(PdserveError):
    """The request body is larger than `max_body_bytes` (413)."""
