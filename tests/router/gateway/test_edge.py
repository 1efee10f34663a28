"""The edge's fast refusals (`gateway/edge.py`), called as raw ASGI: exact status codes,
bodies and headers, and proof of what was *not* done — a refusal decided from headers or
queue state never reads the body (a receive that fails if called), one decided from the
queue never decodes it (a body that is not JSON still gets the 429), and a request whose
body names a priority is decided after parsing, exactly as before."""

from __future__ import annotations

import asyncio
import json

import pytest

from pdserve.router.app import build_app
from pdserve.router.gateway import GatewayConfig
from tests.router.fakes import ScriptedEngineClient
from tests.router.gateway.test_gateway_app import CMPL, keys_file, request, wait_started

pytestmark = pytest.mark.anyio


class Answer:
    def __init__(self, messages: list[dict]) -> None:
        start = messages[0]
        self.status = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start["headers"]}
        self.body = json.loads(b"".join(m.get("body", b"") for m in messages[1:]) or b"null")

    def error(self, status: int) -> dict:
        assert self.status == status, (self.status, self.body)
        assert self.headers["content-type"] == "application/json"
        assert int(self.headers["content-length"]) == len(
            json.dumps(self.body, separators=(",", ":"))
        )
        assert set(self.body["error"]) == {"message", "type", "param", "code"}
        return self.body["error"]


def must_not_read() -> object:
    async def receive() -> dict:
        raise AssertionError("the body was read")

    return receive


def once(body: bytes) -> object:
    sent = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if sent:
            return sent.pop()
        await asyncio.Event().wait()  # then the client stays connected

    return receive


async def call(app, receive, length: int, headers: dict[str, str] | None = None) -> Answer:
    raw = [(b"host", b"test"), (b"content-length", str(length).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CMPL,
        "raw_path": CMPL.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return Answer(messages)


async def post_body(app, body: bytes, headers: dict[str, str] | None = None) -> Answer:
    return await call(app, once(body), len(body), headers)


@pytest.fixture
def hanging(tokenizer):
    return ScriptedEngineClient(tokenizer, [], hang=True)


@pytest.fixture
def tokenizer(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(builtin_model_dir)


async def park(app, client, body: dict) -> asyncio.Future:
    """A request that is admitted and then waits for its first token forever."""
    parked = asyncio.ensure_future(post_body(app, json.dumps(body).encode()))
    await wait_started(client, len(client.started) + 1)
    return parked


async def test_full_queue_refuses_without_decoding_the_body(hanging):
    app = build_app(hanging, gateway=GatewayConfig(max_queued_requests=1))
    parked = await park(app, hanging, {"prompt": [1, 2], "max_tokens": 4})
    refused = await post_body(app, b"{this is not JSON")  # the route would answer 400
    failure = refused.error(429)
    assert (failure["type"], failure["code"]) == ("overloaded", "queue_full")
    assert refused.headers["retry-after"] == "1" and int(refused.headers["retry-after-ms"]) >= 1
    assert len(hanging.started) == 1
    metrics = (await request(app, "GET", "/metrics")).text
    assert 'pdserve:requests_rejected_total{reason="queue_full"} 1.0' in metrics
    # A body naming a priority is parsed, then decided: priority -1 evicts the parked one.
    urgent = asyncio.ensure_future(post_body(app, b'{"prompt": [3], "priority": -1}'))
    assert (await asyncio.wait_for(parked, 10)).error(429)["code"] == "evicted"
    await wait_started(hanging, 2)
    assert hanging.priorities == [0, -1]
    urgent.cancel()


async def test_ttft_target_refusal_from_the_queue_alone(hanging):
    config = GatewayConfig(admission_ttft_ms=100, admission_prefill_tokens_per_s=1000)
    app = build_app(hanging, gateway=config)
    parked = await park(app, hanging, {"prompt": [1] * 150})  # 150 ms of queue: over 100
    failure = (await post_body(app, b"not JSON either")).error(429)
    assert failure["code"] == "ttft_unattainable" and "predicted 151 ms" in failure["message"]
    assert len(hanging.started) == 1
    parked.cancel()


async def test_key_quota_refusal_never_reads_the_body(tmp_path, hanging):
    path = keys_file(tmp_path, "{name: a, key: sk-a, max_concurrent: 1, requests_per_minute: 2}")
    app = build_app(hanging, gateway=GatewayConfig(api_keys_file=path))
    auth = {"authorization": "Bearer sk-a"}
    parked = asyncio.ensure_future(post_body(app, b'{"prompt": [1]}', auth))
    await wait_started(hanging, 1)
    refused = await call(app, must_not_read(), 20, auth)
    assert refused.error(429)["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "1"  # over concurrency: not taken
    assert refused.headers["retry-after"] == "1"
    parked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await parked
    # The edge closed the cancelled request's lease: the key's slot is free again.
    assert app.state.gateway.keys.keys[0].num_running == 0


async def test_wrong_key_is_401_and_counted_once(tmp_path, hanging):
    path = keys_file(tmp_path, "{name: a, key: sk-a}")
    app = build_app(hanging, gateway=GatewayConfig(api_keys_file=path))
    answer = await post_body(app, b'{"prompt": [1]}', {"authorization": "Bearer sk-b"})
    assert answer.error(401)["code"] == "invalid_api_key"
    assert answer.headers["www-authenticate"] == "Bearer"
    metrics = (await request(app, "GET", "/metrics")).text
    assert 'pdserve:requests_rejected_total{reason="unauthorized"} 1.0' in metrics


async def test_declared_length_over_the_cap_is_413_unread_and_closes(hanging):
    app = build_app(hanging, gateway=GatewayConfig(max_body_bytes=1000))
    answer = await call(app, must_not_read(), 1001)
    failure = answer.error(413)
    assert failure["code"] == "request_too_large" and "is 1001 bytes" in failure["message"]
    assert answer.headers["connection"] == "close"


async def test_limit_concurrency_answers_503_in_openai_shape(hanging):
    app = build_app(hanging, gateway=GatewayConfig(limit_concurrency=1))
    parked = await park(app, hanging, {"prompt": [1]})
    busy = await call(app, must_not_read(), 10)
    failure = busy.error(503)
    assert (failure["type"], failure["code"]) == ("overloaded", "server_busy")
    assert busy.headers["retry-after"] == "1"
    assert (await request(app, "GET", "/health")).status_code == 200  # other routes pass
    parked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await parked
    assert app.edge.num_in_flight == 0
    metrics = (await request(app, "GET", "/metrics")).text
    assert 'pdserve:requests_rejected_total{reason="busy"} 1.0' in metrics
