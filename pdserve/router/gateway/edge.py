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
   0: it can only be refused, never let in, by that. When the whole body is at hand (the
   HTTP protocol's fast path, `fast_http.py`), a request that passes that test, or names
   a priority, is also judged at its own size: the body is decoded as JSON (no model,
   no tokenisation) for its priority and a lower bound on the prompt tokens it will queue
   (`limits.queued_tokens_floor`: token ids counted, text bytes over the longest token's
   bytes), so a 256-token request that would miss the TTFT target is refused here too,
   exactly as the route would, while a one-token request behind the same queue is not.

A request that passes carries its `Lease` (the key's slot, taken in step 3) to the route
in the ASGI scope's state (`lease`); the route uses it instead of opening another, and the
edge closes it (idempotently) when the app returns, so no exit path leaks the slot.
Under `pdserve serve`, `fast_http.py` calls `refuse_busy` and `screen` from the HTTP
protocol itself, with the whole body, and writes refusals without going through ASGI;
requests it lets through arrive here with their `Screening` in the scope state
(`SCREENED`) and are only run. Refusals here are counted in `pdserve:requests_rejected_total` like the route's, with
the reason `busy` for step 1. Everything else (other paths, methods, websockets) passes
through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from pdserve.router.gateway.errors import PayloadTooLargeError, RateLimitedError
from pdserve.router.gateway.gate import Gateway, Lease
from pdserve.router.gateway.limits import queued_tokens_floor, too_large_message
from pdserve.router.protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
PRIORITY_KEY = b"priority"
SCREENED = "pdserve.screened"  # scope state: the `Screening` the fast path made
BUSY_MESSAGE = "the server has too many requests in flight (limit_concurrency {}); retry later"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A complete error answer: status, OpenAI error body, extra headers."""

    status: int
    body: dict
    headers: dict[str, str]


@dataclass(slots=True)
class Screening:
    """What the edge decided about one generation request (counted in flight).

    `refusal`: answer it and stop. Otherwise the app runs it with `key` and `lease`
    (`lease` None: the token names no key and the app answers the 401), and
    `needs_body` says admission still wants the first body message (`refuse_early`)."""

    refusal: Refusal | None = None
    key: Any = None
    lease: Lease | None = None
    needs_body: bool = False


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
        screened = scope.get("state", {}).pop(SCREENED, None)
        if screened is not None:  # the HTTP protocol's fast path decided and counted it
            await self._run(scope, receive, send, screened)
            return
        busy = self.refuse_busy()
        if busy is not None:
            await respond(send, busy)
            return
        self.num_in_flight += 1
        await self._run(scope, receive, send, self.screen(scope["headers"], None))

    def refuse_busy(self) -> Refusal | None:
        """Step 1: the 503 when `limit_concurrency` requests are in flight."""
        if self.limit is None or self.num_in_flight < self.limit:
            return None
        self.gateway.metrics.rejected.labels("busy").inc()
        body = error_body(BUSY_MESSAGE.format(self.limit), "overloaded", code="server_busy")
        return Refusal(503, body, {"retry-after": "1"})

    def screen(self, headers: list[tuple[bytes, bytes]], body: bytes | None) -> Screening:
        """Steps 2-4 for a request already counted in flight. `body`: the whole body when
        it is known (the HTTP protocol's fast path), None when not yet read."""
        length, token = _headers(headers)
        max_bytes = self.gateway.config.max_body_bytes
        if length is not None and length > max_bytes:
            exc = PayloadTooLargeError(too_large_message(length, max_bytes))
            return Screening(self._refusal(exc, {"connection": "close"}))
        try:
            key = self.gateway.lookup(token)
        except LookupError:  # the app's auth dependency answers the 401
            return Screening()
        try:
            lease = self.gateway.open(key)
        except RateLimitedError as exc:
            return Screening(self._refusal(exc))
        admission = self.gateway.admission
        if not admission.is_active:
            return Screening(key=key, lease=lease)
        if body is None:
            return Screening(key=key, lease=lease, needs_body=True)
        if PRIORITY_KEY in body:  # the priority decides: read it from the body
            refused = self._refuse_whole(body)
        else:
            refused = admission.refuse_early(0)  # full for any request of priority 0
            if refused is None and admission.target_s is not None:
                refused = self._refuse_whole(body)  # too late at this request's size
        if refused is None:
            return Screening(key=key, lease=lease)
        refusal = self._refusal(refused, lease.headers)
        lease.close()
        return Screening(refusal)

    def _refuse_whole(self, body: bytes) -> RateLimitedError | None:
        """Admission's refusal for a body read whole, from a lower bound on the prompt
        tokens it will queue and its priority (`limits.queued_tokens_floor`: a JSON
        decode, no tokenisation), or None when the body does not say."""
        floor = queued_tokens_floor(body, self.gateway.token_bytes)
        if floor is None:
            return None
        num_tokens, priority = floor
        return self.gateway.admission.refuse_early(priority, num_tokens)

    def finish(self, screened: Screening) -> None:
        """The end of a request counted in flight (refused or run)."""
        if screened.lease is not None:
            screened.lease.close()
        self.num_in_flight -= 1

    async def _run(self, scope: Scope, receive: Receive, send: Send, screened: Screening) -> None:
        try:
            if screened.refusal is not None:
                await respond(send, screened.refusal)
                return
            if screened.lease is None:
                await self.app(scope, receive, send)
                return
            if screened.needs_body:
                receive, refusal = await self._admission(receive, screened.lease)
                if refusal is not None:
                    await respond(send, refusal)
                    return
            state = scope.setdefault("state", {})
            state["api_key"], state["lease"] = screened.key, screened.lease
            await self.app(scope, receive, send)
        finally:
            self.finish(screened)

    async def _admission(self, receive: Receive, lease: Lease) -> tuple[Receive, Refusal | None]:
        """(the receive the app must use, the refusal the queue alone decides or None)."""
        message = await receive()
        replay = _replaying(message, receive)
        if (
            message["type"] != "http.request"
            or message.get("more_body", False)
            or PRIORITY_KEY in message.get("body", b"")
        ):
            return replay, None  # priority unknown before parsing: the route decides
        refused = self.gateway.admission.refuse_early(0)
        return replay, None if refused is None else self._refusal(refused, lease.headers)

    def _refusal(self, exc: Exception, extra: dict[str, str] | None = None) -> Refusal:
        from pdserve.router.serving import describe_error, error_headers  # serving imports us

        self.gateway.note_refusal(exc)
        status, body = describe_error(exc)
        return Refusal(status, body, {**(extra or {}), **(error_headers(exc) or {})})


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


def response_headers(refusal: Refusal) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(the JSON body, the headers) of a refusal, as both HTTP paths send them."""
    content = json.dumps(refusal.body, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in refusal.headers.items()]
    return content, raw


async def respond(send: Send, refusal: Refusal) -> None:
    """A complete JSON response in two ASGI messages."""
    content, raw = response_headers(refusal)
    await send({"type": "http.response.start", "status": refusal.status, "headers": raw})
    await send({"type": "http.response.body", "body": content})
