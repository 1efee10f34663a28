"""The HTTP protocol the router serves with: uvicorn's httptools protocol, plus the edge's
refusals answered below ASGI.

Why: the edge (`edge.py`) decides a refusal in microseconds, but reaching it costs more:
for every request uvicorn builds a scope, a request/response cycle and an asyncio task,
and the answer goes out through two ASGI sends. Measured on the router's one event loop
(docs/benchmarks.md, "Fast refusals"), that is ~75 us of CPU per 429, so 2000 requests
arriving at once were refused one after another for ~0.6 s. Here a generation request is
held in the protocol until its body is in (bodies of a request that could be refused are
small: a few KiB), the edge screens it with method, path, headers and the whole body
(`Edge.refuse_busy`, `Edge.screen`: the same decisions in the same order), and a refusal
is written straight to the transport: no scope handed to the app, no task, no ASGI
message. The bytes are those the ASGI path sends (uvicorn's default headers, then the
edge's headers, `connection: close` when the connection will not be kept).

A request the edge lets through is handed to uvicorn as if it had just been parsed: the
same scope, then the held body, with its `Screening` in the scope state so the edge does
not decide (or count, or take a key's quota) twice.

Not held, so decided on the ASGI path exactly as before: other methods and paths, bodies
without a `Content-Length` or over `MAX_HELD_BYTES` (the edge's 413 comes from there),
`Expect: 100-continue`, upgrades, and requests pipelined behind one still running.

NOTE: this subclasses uvicorn's `HttpToolsProtocol` and uses its per-request attributes
(`url`, `headers`, `scope`, `cycle`, `parser`, `server_state`); uvicorn is pinned in
pyproject.toml, and tests/router/gateway/test_fast_http.py runs a real server with it.
"""

from __future__ import annotations

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from pdserve.router.gateway.edge import GENERATION_PATHS, SCREENED, Edge, Refusal, Screening
from pdserve.router.gateway.edge import response_headers as refusal_headers

HELD_PATHS = frozenset(path.encode() for path in GENERATION_PATHS)
# A body this large is not held (uvicorn would pause reading at this size anyway).
MAX_HELD_BYTES = HIGH_WATER_LIMIT
MAX_REMEMBERED = 256  # encoded refusals kept (see `raw_response`)
_encoded: dict[tuple, bytes] = {}


def fast_refusal_protocol(edge: Edge) -> type[HttpToolsProtocol]:
    """The protocol class for `uvicorn.Config(http=...)` serving the app whose edge is
    `edge`."""
    return type("FastRefusalProtocol", (FastRefusalProtocol,), {"edge": edge})


class FastRefusalProtocol(HttpToolsProtocol):
    edge: Edge  # set by `fast_refusal_protocol`

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.held: bytearray | None = None

    def on_headers_complete(self) -> None:
        if self._should_hold():
            self.held = bytearray()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.held is None:
            super().on_body(body)
        else:
            self.held += body

    def on_message_complete(self) -> None:
        if self.held is None:
            super().on_message_complete()
            return
        body, self.held = bytes(self.held), None
        busy = self.edge.refuse_busy()
        if busy is not None:
            self._refuse(busy)
            return
        self.edge.num_in_flight += 1
        try:
            screened = self.edge.screen(self.headers, body)
        except BaseException:
            self.edge.num_in_flight -= 1
            raise
        if screened.refusal is not None:
            self.edge.finish(screened)
            self._refuse(screened.refusal)
            return
        self._hand_over(screened, body)

    def _should_hold(self) -> bool:
        if (
            self.parser.get_method() != b"POST"
            or self.url.partition(b"?")[0] not in HELD_PATHS
            or self.expect_100_continue
            or self.parser.should_upgrade()
            or (self.cycle is not None and not self.cycle.response_complete)
        ):
            return False
        length = next((v for n, v in self.headers if n == b"content-length"), None)
        return length is not None and length.isdigit() and int(length) <= MAX_HELD_BYTES

    def _hand_over(self, screened: Screening, body: bytes) -> None:
        """Start the request on uvicorn's path, as if its headers had just been parsed."""
        self.scope["state"][SCREENED] = screened
        try:
            super().on_headers_complete()
        except BaseException:
            self.edge.finish(screened)  # no app call will end it
            raise
        if body:
            super().on_body(body)
        super().on_message_complete()

    def _refuse(self, refusal: Refusal) -> None:
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self.transport.write(raw_response(refusal, self.server_state.default_headers, keep_alive))
        if not keep_alive or refusal.headers.get("connection") == "close":
            self.transport.close()
        self.on_response_complete()  # counts it; arms keep-alive or starts a pipelined one


def raw_response(
    refusal: Refusal, default_headers: list[tuple[bytes, bytes]], keep_alive: bool
) -> bytes:
    """The refusal's bytes on the wire, as uvicorn's cycle writes an ASGI response.
    Remembered: a burst of refusals is mostly the same few answers (the message changes
    with the queue, the default `date` header once a second), and encoding one costs
    more than everything else the fast path does."""
    key = (
        refusal.status,
        tuple(refusal.body["error"].values()),
        tuple(refusal.headers.items()),
        tuple(default_headers),
        keep_alive,
    )
    found = _encoded.get(key)
    if found is None:
        if len(_encoded) >= MAX_REMEMBERED:
            _encoded.clear()
        found = _encoded[key] = _encode(refusal, default_headers, keep_alive)
    return found


def _encode(
    refusal: Refusal, default_headers: list[tuple[bytes, bytes]], keep_alive: bool
) -> bytes:
    content, headers = refusal_headers(refusal)
    out = [STATUS_LINE[refusal.status]]
    closes = False
    for name, value in default_headers + headers:
        name = name.lower()
        closes |= name == b"connection" and b"close" in value.lower()
        out += [name, b": ", value, b"\r\n"]
    if not keep_alive and not closes:
        out.append(b"connection: close\r\n")
    out += [b"\r\n", content]
    return b"".join(out)
