"""`Edge`: the raw ASGI layer in front of FastAPI that answers overload refusals at once.

Why: under a burst the router's one event loop runs every request through FastAPI (route
matching, dependencies, pydantic parsing, sampling parameters, the generation's setup)
before admission refuses it: ~0.5 ms of Python per 429 on an idle core, so the 500th
refusal of a simultaneous burst waited behind 499 others for ~1 s. Most refusals are
known before any of that: the server is full, the key is over its quota, the body is
too large. The edge decides those from what the HTTP parser already holds (method,
path, headers) and the gateway's state, in a few microseconds, and only requests it
cannot refuse go on to FastAPI.

For `POST /v1/completions` and `/v1/chat/completions`, in order:

1. `limit_concurrency` requests already in flight -> 503 (code `server_busy`,
   `Retry-After: 1`). Requests, not connections: idle keep-alive connections cost
   nothing and must not lock everyone out (uvicorn's own limit counted them).
2. `Content-Length` over `max_body_bytes` -> 413, with `Connection: close`, before a
   byte of the body is read.
3. The bearer token names a key (`Gateway.lookup`; a missing or wrong token goes on
   to the app, which answers the 401), whose quota is taken (`Gateway.open`: requests
   per minute, concurrency -> 429 with `Retry-After` and `x-ratelimit-*`).
4. Admission from the queue alone (`Admission.refuse_early`): a request that would be
   refused whatever its size (its priority's queue is full, or even one prompt token
   ahead of what is queued misses the TTFT target) -> 429. The one input the queue
   cannot know is the request's `priority`; the edge takes the body message the parser
   has already buffered (no decoding) and, when the bytes `priority` do not occur in it,
   the request has the default priority 0 and the decision is exact. When they do (or
   the body comes in several messages) the request goes on and is decided after parsing.
   A body that spells the key with JSON escapes (`\\u0070riority`) is judged as priority
   0: it can only be refused, never let in, by that.

A request that passes carries its `Lease` (the key's slot, taken in step 3) to the route
in the ASGI scope's state (`lease`); the route uses it instead of opening another, and the
edge closes it (idempotently) when the app returns, so no exit path leaks the slot.
Refusals here are counted in `pdserve:requests_rejected_total` like the route's, with
the reason `busy` for step 1. Everything else (other paths, methods, websockets) passes
through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pdserve.router.gateway.errors import PayloadTooLargeError, RateLimitedError
from pdserve.router.gateway.gate import Gateway
from pdserve.router.gateway.limits import too_large_message
from pdserve.router.protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
PRIORITY_KEY = b"priority"
BUSY_MESSAGE = "the server has too many requests in flight (limit_concurrency {}); retry later"


class Edge:
    def __init__(self, app: App, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        self.limit = gateway.config.limit_concurrency
        self.num_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        if self.limit is not None and self.num_in_flight >= self.limit:
            self.gateway.metrics.rejected.labels("busy").inc()
            body = error_body(BUSY_MESSAGE.format(self.limit), "overloaded", code="server_busy")
            await respond(send, 503, body, {"retry-after": "1"})
            return
        self.num_in_flight += 1
        try:
            await self._generation(scope, receive, send)
        finally:
            self.num_in_flight -= 1

    async def _generation(self, scope: Scope, receive: Receive, send: Send) -> None:
        length, token = _headers(scope["headers"])
        max_bytes = self.gateway.config.max_body_bytes
        if length is not None and length > max_bytes:
            exc = PayloadTooLargeError(too_large_message(length, max_bytes))
            await self._refuse(send, exc, {"connection": "close"})
            return
        try:
            key = self.gateway.lookup(token)
        except LookupError:  # the app's auth dependency answers the 401
            await self.app(scope, receive, send)
            return
        try:
            lease = self.gateway.open(key)
        except RateLimitedError as exc:
            await self._refuse(send, exc)
            return
        try:
            receive, refusal = await self._admission(receive)
            if refusal is not None:
                await self._refuse(send, refusal, lease.headers)
                return
            state = scope.setdefault("state", {})
            state["api_key"], state["lease"] = key, lease
            await self.app(scope, receive, send)
        finally:
            lease.close()

    async def _admission(self, receive: Receive) -> tuple[Receive, RateLimitedError | None]:
        """(the receive the app must use, the refusal the queue alone decides or None)."""
        admission = self.gateway.admission
        if not admission.is_active:
            return receive, None
        message = await receive()
        replay = _replaying(message, receive)
        if (
            message["type"] != "http.request"
            or message.get("more_body", False)
            or PRIORITY_KEY in message.get("body", b"")
        ):
            return replay, None  # priority unknown before parsing: the route decides
        return replay, admission.refuse_early(0)

    async def _refuse(
        self, send: Send, exc: Exception, extra: dict[str, str] | None = None
    ) -> None:
        from pdserve.router.serving import describe_error, error_headers  # serving imports us

        self.gateway.note_refusal(exc)
        status, body = describe_error(exc)
        await respond(send, status, body, {**(extra or {}), **(error_headers(exc) or {})})


def _headers(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, str | None]:
    """(declared Content-Length, bearer token) from raw ASGI headers (names lower-case).
    The token is None without an Authorization header and "" when its scheme is not
    Bearer, as the app's auth dependency reads it."""
    length = token = None
    for name, value in headers:
        if name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif name == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            token = rest.strip() if scheme.lower() == "bearer" else ""
    return length, token


def _replaying(first: Message, receive: Receive) -> Receive:
    """A receive that gives `first` once, then whatever `receive` gives."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def respond(send: Send, status: int, body: dict, headers: dict[str, str]) -> None:
    """A complete JSON response in two ASGI messages."""
    content = json.dumps(body, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})
