"""The edge's refusals answered in the HTTP protocol (`gateway/fast_http.py`), on a real
uvicorn server over real sockets: the bytes are those of the ASGI path (uvicorn's plain
httptools protocol, same app) except the `date` header's value, no ASGI call is made for
a refused request, and a request let through runs on the ASGI path with its key's slot
and the in-flight count given back when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest
import uvicorn

from pdserve.router.app import build_app
from pdserve.router.gateway import GatewayConfig
from pdserve.router.gateway.fast_http import fast_refusal_protocol
from tests.router.fakes import ScriptedEngineClient
from tests.router.gateway.test_gateway_app import CMPL, SCRIPT, keys_file, wait_started

pytestmark = pytest.mark.anyio


@pytest.fixture
def tokenizer(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(builtin_model_dir)


class Served:
    def __init__(self, app, fast: bool) -> None:
        self.app = app
        self.asgi_paths: list[str] = []  # one per request that reached the ASGI app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

        async def counted(scope, receive, send):
            self.asgi_paths.append(scope.get("path"))
            await app(scope, receive, send)

        http = fast_refusal_protocol(app.edge) if fast else "httptools"
        config = uvicorn.Config(counted, http=http, lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)


@contextlib.asynccontextmanager
async def serving(app, fast: bool = True):
    served = Served(app, fast)
    task = asyncio.create_task(served.server.serve(sockets=[served.sock]))
    while not served.server.started:
        await asyncio.sleep(0.01)
    try:
        yield served
    finally:
        served.server.should_exit = True
        served.server.force_exit = True
        await asyncio.wait_for(task, 10)


def raw_request(body: bytes, headers: dict[str, str] | None = None, version: str = "1.1") -> bytes:
    lines = [f"POST {CMPL} HTTP/{version}", "Host: test", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[list[bytes], bytes]:
    """(the status line and header lines, the body); the values that follow the clock
    (`date`, `x-ratelimit-reset-*`) are left out."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = [_timeless(x) for x in head[:-4].split(b"\r\n")]
    length = next(
        int(v) for n, _, v in (x.partition(b": ") for x in lines) if n == b"content-length"
    )
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return [x for x in lines if x != b"date"], body


def _timeless(line: bytes) -> bytes:
    name = line.partition(b": ")[0]
    return name if name == b"date" or name.startswith(b"x-ratelimit-reset") else line


async def exchange(port: int, *requests: bytes) -> list[tuple[list[bytes], bytes]]:
    """Send `requests` on one connection (all at once: pipelined) and read their answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(requests))
    try:
        return [await read_answer(reader) for _ in requests]
    finally:
        writer.close()


async def park(port: int, client, body: dict, headers=None) -> asyncio.StreamWriter:
    """A request admitted and then waiting forever for its first token."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_request(json.dumps(body).encode(), headers))
    await wait_started(client, len(client.started) + 1)
    return writer


async def refusal_both_ways(tokenizer, config, body: bytes, headers=None, parked=None):
    """The refusal of `body` from the fast and the plain server, each with one request
    parked first; and the paths that reached ASGI on the fast one."""
    answers, fast_paths = [], None
    for fast in (True, False):
        client = ScriptedEngineClient(tokenizer, [], hang=True)
        app = build_app(client, gateway=config)
        async with serving(app, fast) as served:
            writer = await park(served.port, client, parked or {"prompt": [1, 2]}, headers)
            answers.append((await exchange(served.port, raw_request(body, headers)))[0])
            if fast:
                fast_paths = list(served.asgi_paths)
            writer.close()
    assert answers[0] == answers[1]
    assert fast_paths == [CMPL]  # the parked request only: the refusal never reached ASGI
    return answers[0]


async def test_queue_full_429_is_the_asgi_paths_answer(tokenizer):
    config = GatewayConfig(max_queued_requests=1)
    (status, *headers), body = await refusal_both_ways(tokenizer, config, b"{not JSON")
    assert status == b"HTTP/1.1 429 Too Many Requests"
    assert b"server: uvicorn" in headers and b"content-type: application/json" in headers
    assert b"retry-after: 1" in headers
    assert json.loads(body)["error"]["code"] == "queue_full"


async def test_busy_503_is_the_asgi_paths_answer(tokenizer):
    config = GatewayConfig(limit_concurrency=1)
    (status, *headers), body = await refusal_both_ways(tokenizer, config, b'{"prompt": [1]}')
    assert status == b"HTTP/1.1 503 Service Unavailable" and b"retry-after: 1" in headers
    assert json.loads(body)["error"]["code"] == "server_busy"


async def test_key_quota_429_is_the_asgi_paths_answer(tokenizer, tmp_path):
    path = keys_file(tmp_path, "{name: a, key: sk-a, max_concurrent: 1, requests_per_minute: 5}")
    auth = {"Authorization": "Bearer sk-a"}
    config = GatewayConfig(api_keys_file=path)
    (status, *headers), body = await refusal_both_ways(tokenizer, config, b"{}", auth)
    assert status.startswith(b"HTTP/1.1 429") and b"x-ratelimit-limit-requests: 5" in headers
    assert b"x-ratelimit-remaining-requests: 4" in headers
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"


async def test_ttft_429_carries_the_keys_headers_on_both_paths(tokenizer, tmp_path):
    path = keys_file(tmp_path, "{name: a, key: sk-a, requests_per_minute: 100}")
    config = GatewayConfig(
        api_keys_file=path, admission_ttft_ms=100, admission_prefill_tokens_per_s=1000
    )
    auth = {"Authorization": "Bearer sk-a"}
    (status, *headers), body = await refusal_both_ways(
        tokenizer, config, b"[]", auth, parked={"prompt": [1] * 150}
    )
    assert status.startswith(b"HTTP/1.1 429")
    assert b"x-ratelimit-limit-requests: 100" in headers
    assert json.loads(body)["error"]["code"] == "ttft_unattainable"


async def test_refusals_keep_the_connection_or_close_it_as_asked(tokenizer):
    client = ScriptedEngineClient(tokenizer, [], hang=True)
    app = build_app(client, gateway=GatewayConfig(max_queued_requests=1))
    async with serving(app) as served:
        writer = await park(served.port, client, {"prompt": [1]})
        two = await exchange(served.port, raw_request(b"{}"), raw_request(b"{}"))  # pipelined
        assert [a[0][0] for a in two] == [b"HTTP/1.1 429 Too Many Requests"] * 2
        reader, old = await asyncio.open_connection("127.0.0.1", served.port)
        old.write(raw_request(b"{}", version="1.0"))
        (_, *headers), _ = await read_answer(reader)
        assert b"connection: close" in headers
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        assert served.asgi_paths == [CMPL]
        assert app.edge.num_in_flight == 1  # the parked one
        writer.close()


async def test_a_request_let_through_runs_and_gives_back_its_slot(tokenizer, tmp_path):
    path = keys_file(tmp_path, "{name: a, key: sk-a, max_concurrent: 1}")
    client = ScriptedEngineClient(tokenizer, SCRIPT, finish=True)
    app = build_app(client, gateway=GatewayConfig(api_keys_file=path, max_queued_requests=4))
    auth = {"Authorization": "Bearer sk-a"}
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    async with serving(app) as served:
        answers = await exchange(served.port, raw_request(body, auth), raw_request(body, auth))
        for (status, *_), text in answers:  # one after the other on one connection
            assert status == b"HTTP/1.1 200 OK"
            assert json.loads(text)["choices"][0]["text"] == "Hello"
        assert served.asgi_paths == [CMPL, CMPL]
        assert app.edge.num_in_flight == 0
        assert app.state.gateway.keys.keys[0].num_running == 0
        metrics = app.state.metrics.registry
        assert metrics.get_sample_value("pdserve:key_requests_total", {"key_name": "a"}) == 2


def as_dict(answer: tuple[list[bytes], bytes]) -> tuple[bytes, dict, dict]:
    (status, *headers), body = answer
    return status, dict(h.partition(b": ")[::2] for h in headers), json.loads(body)


async def test_a_request_too_large_for_the_ttft_target_is_refused_at_its_own_size(tokenizer):
    """50 tokens queued at 1000 tokens/s against a 100 ms target: a 1-token request fits,
    a 100-token one does not. The fast path refuses the latter from its body, with the
    route's answer (same status, body and headers), and lets the former through."""
    config = GatewayConfig(admission_ttft_ms=100, admission_prefill_tokens_per_s=1000)
    big, small = json.dumps({"prompt": [7] * 100}), json.dumps({"prompt": [7]})
    answers, paths = [], []
    for fast in (True, False):
        client = ScriptedEngineClient(tokenizer, [], hang=True)
        app = build_app(client, gateway=config)
        async with serving(app, fast) as served:
            writer = await park(served.port, client, {"prompt": [1] * 50})
            answers.append(as_dict((await exchange(served.port, raw_request(big.encode())))[0]))
            paths.append(list(served.asgi_paths))
            if fast:
                let_through = await park(served.port, client, json.loads(small))
                assert len(client.started) == 2 and served.asgi_paths == [CMPL, CMPL]
                let_through.close()
            writer.close()
    assert answers[0] == answers[1]
    status, headers, body = answers[0]
    assert status.startswith(b"HTTP/1.1 429") and body["error"]["code"] == "ttft_unattainable"
    assert "predicted 150 ms" in body["error"]["message"] and headers[b"retry-after"] == b"1"
    assert paths == [[CMPL], [CMPL, CMPL]]  # the fast path never reached ASGI for it
