"""The gateway through HTTP: every 400/401/408/413/429 path with its headers and body,
over the scripted engine client (and the real in-process engine where a worker could
die)."""

from __future__ import annotations

import asyncio
import json

import httpx2 as httpx
import pytest

from pdserve import SamplingParams
from pdserve.router.app import build_app
from pdserve.router.gateway import GatewayConfig
from tests.router.fakes import ScriptedEngineClient

pytestmark = pytest.mark.anyio

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
SCRIPT = [("He", [10]), ("llo", [11])]
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


async def request(app, method: str, path: str, body=None, headers=None, **kw) -> httpx.Response:
    content = json.dumps(body) if isinstance(body, (dict, list)) else body
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.request(method, path, content=content, headers=headers, **kw)


async def post(app, path: str, body, headers=None) -> httpx.Response:
    return await request(app, "POST", path, body, headers)


def error(response: httpx.Response, status_code: int) -> dict:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
def tokenizer(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(builtin_model_dir)


@pytest.fixture
def scripted(tokenizer):
    return ScriptedEngineClient(tokenizer, SCRIPT, finish=True)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- input limits ---------------------------------------------------------------------------

HOSTILE = [
    ('{"prompt": "x", "temperature": 1e400}', "temperature"),
    ('{"prompt": "x", "top_p": NaN}', "top_p"),  # not JSON, but parsers take it
    ('{"prompt": "x", "seed": 1208925819614629174706176}', "seed"),  # 2**80
    ('{"prompt": "x", "top_k": 1e20}', "top_k"),
    ('{"prompt": "x", "n": 100000}', "n"),
    ('{"prompt": "x", "max_tokens": 1e30}', "max_tokens"),
    ('{"prompt": "x", "logprobs": 99}', "logprobs"),
    ('{"prompt": "x", "min_tokens": -1}', "min_tokens"),
    ('{"prompt": "x", "stop": ' + json.dumps(["s"] * 17) + "}", "stop"),
    ('{"prompt": "x", "stop": "' + "s" * 257 + '"}', "stop"),
    ('{"prompt": "x", "stop_token_ids": ' + json.dumps([1] * 65) + "}", "stop_token_ids"),
    ('{"prompt": ' + json.dumps(["p"] * 65) + "}", "prompt"),
    ('{"prompt": [1, 2, 18446744073709551616]}', "prompt"),
    ('{"prompt": "x", "priority": 1e300}', "priority"),
    ('{"prompt": "x", "timeout": -1}', "timeout"),
    ('{"prompt": "x", "timeout": 1e999}', "timeout"),
    ('{"prompt": "x", "presence_penalty": 0.5}', "presence_penalty"),
    ('{"prompt": "x", "logit_bias": {"1": 100}}', "logit_bias"),
    ('{"prompt": "x", "suffix": "tail"}', "suffix"),
    ('{"prompt": "x", "repetition_penalty": 1.2}', "repetition_penalty"),
]


@pytest.mark.parametrize(("raw", "param"), HOSTILE)
async def test_hostile_completion_values_get_400_naming_the_field(scripted, raw, param):
    failure = error(await post(build_app(scripted), CMPL, raw), 400)
    assert failure["param"] == param, failure
    assert failure["type"] == "invalid_request_error"
    assert scripted.started == []  # refused before any work


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temperature": 1e400}, "temperature"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ],
)
async def test_unsupported_chat_features_are_named(scripted, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    assert error(await post(build_app(scripted), CHAT, body), 400)["param"] == param


async def test_harmless_defaults_of_unsupported_fields_are_accepted(scripted):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
        "store": False,  # unknown and meaningless here: ignored
    }
    response = await post(build_app(scripted), CHAT, body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello"


async def test_configured_limits_apply(scripted):
    config = GatewayConfig(max_n=2, max_stop=1, max_prompts=2, max_stop_token_ids=0)
    app = build_app(scripted, gateway=config)
    for body, param in [
        ({"prompt": "x", "n": 3}, "n"),
        ({"prompt": "x", "stop": ["a", "b"]}, "stop"),
        ({"prompt": ["a", "b", "c"]}, "prompt"),
        ({"prompt": "x", "stop_token_ids": [1]}, "stop_token_ids"),
    ]:
        assert error(await post(app, CMPL, body), 400)["param"] == param
    assert (await post(app, CMPL, {"prompt": ["a", "b"], "n": 2})).status_code == 200


async def test_body_over_the_cap_is_413_by_header_and_while_reading(scripted):
    app = build_app(scripted, gateway=GatewayConfig(max_body_bytes=1000))
    big = json.dumps({"prompt": "x" * 2000})
    failure = error(await post(app, CMPL, big), 413)
    assert failure["code"] == "request_too_large" and "limit is 1000 bytes" in failure["message"]

    async def chunks():  # no Content-Length: counted while read
        for _ in range(10):
            yield b" " * 200

    response = await request(app, "POST", CMPL, chunks())
    assert "is at least 1200 bytes" in error(response, 413)["message"]
    assert scripted.started == []
    assert (await post(app, CMPL, {"prompt": "x" * 500})).status_code == 200


class CountingTokenizer:
    """Wraps a tokenizer, counting encode calls: proves a prompt was refused untokenised."""

    def __init__(self, tokenizer) -> None:
        self.inner = tokenizer
        self.num_encodes = 0

    def encode(self, *args, **kwargs):
        self.num_encodes += 1
        return self.inner.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_prompt_too_big_for_any_context_is_refused_without_tokenising(tokenizer):
    counting = CountingTokenizer(tokenizer)
    client = ScriptedEngineClient(counting, SCRIPT, finish=True, max_model_len=256)
    app = build_app(client)
    counting.num_encodes = 0
    cap = app.state.gateway.max_prompt_bytes
    assert cap >= 256  # context x the longest token's bytes
    failure = error(await post(app, CMPL, {"prompt": "a" * (cap + 1)}), 400)
    assert failure["param"] == "prompt" and "fits this model's context" in failure["message"]
    chat = {"messages": [{"role": "user", "content": "é" * cap}]}  # 2 bytes each
    assert error(await post(app, CHAT, chat), 400)["param"] == "messages"
    assert counting.num_encodes == 0


async def test_a_large_prompt_is_tokenised_off_the_loop(tokenizer):
    import threading

    threads = []
    counting = CountingTokenizer(tokenizer)
    original = counting.encode

    def encode(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return original(*args, **kwargs)

    counting.encode = encode
    client = ScriptedEngineClient(counting, SCRIPT, finish=True, max_model_len=100_000)
    app = build_app(client)
    threads.clear()
    assert (await post(app, CMPL, {"prompt": "word " * 4000})).status_code == 200
    assert (await post(app, CMPL, {"prompt": "short"})).status_code == 200
    assert threads == [False, True]  # the big one in a worker thread, the small inline


async def test_infinite_temperature_kills_nothing(engine_client, reference_llm):
    app = build_app(engine_client)
    raw = '{"prompt": "Hello", "temperature": 1e400, "min_tokens": 2, "max_tokens": 4}'
    assert error(await post(app, CMPL, raw), 400)["param"] == "temperature"
    response = await post(app, CMPL, {"prompt": "Hello", **GREEDY})
    assert response.status_code == 200
    expected = reference_llm.generate("Hello", SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[
        0
    ]
    assert response.json()["choices"][0]["text"] == expected.text


# -- keys and quotas ------------------------------------------------------------------------


def keys_file(tmp_path, *entries: str) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + "".join(f"  - {e}\n" for e in entries))
    return str(path)


async def test_keys_file_and_single_key_both_authenticate(tmp_path, scripted):
    config = GatewayConfig(
        api_key="sk-one", api_keys_file=keys_file(tmp_path, "{name: a, key: sk-a}")
    )
    app = build_app(scripted, gateway=config)
    for key in ("sk-one", "sk-a"):
        response = await post(app, CMPL, {"prompt": "x"}, bearer(key))
        assert response.status_code == 200, response.text
    failure = error(await post(app, CMPL, {"prompt": "x"}, bearer("sk-b")), 401)
    assert failure["code"] == "invalid_api_key"
    response = await post(app, CMPL, {"prompt": "x"})
    assert error(response, 401)["code"] is None
    assert response.headers["www-authenticate"] == "Bearer"
    assert error(await request(app, "GET", "/v1/models"), 401)
    metrics = (await request(app, "GET", "/metrics")).text
    assert 'pdserve:key_requests_total{key_name="a"} 1.0' in metrics
    assert 'pdserve:key_requests_total{key_name="default"} 1.0' in metrics
    assert 'pdserve:key_generation_tokens_total{key_name="a"} 2.0' in metrics
    assert 'pdserve:requests_rejected_total{reason="unauthorized"} 3.0' in metrics


async def test_requests_per_minute_429_with_openai_headers(tmp_path, scripted):
    path = keys_file(tmp_path, "{name: a, key: sk-a, requests_per_minute: 2}")
    app = build_app(scripted, gateway=GatewayConfig(api_keys_file=path))
    ok = await post(app, CMPL, {"prompt": "x"}, bearer("sk-a"))
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
    assert (await post(app, CMPL, {"prompt": "x"}, bearer("sk-a"))).status_code == 200
    refused = await post(app, CMPL, {"prompt": "x"}, bearer("sk-a"))
    failure = error(refused, 429)
    assert (failure["type"], failure["code"]) == ("requests", "rate_limit_exceeded")
    assert "2 requests per minute" in failure["message"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 29 <= int(refused.headers["retry-after"]) <= 30
    assert len(scripted.started) == 2
    metrics = (await request(app, "GET", "/metrics")).text
    assert 'pdserve:key_rate_limited_total{key_name="a",limit="requests"} 1.0' in metrics


async def test_tokens_per_minute_charges_prompt_plus_max_tokens(tmp_path, scripted):
    path = keys_file(tmp_path, "{name: a, key: sk-a, tokens_per_minute: 50}")
    app = build_app(scripted, gateway=GatewayConfig(api_keys_file=path))
    failure = error(await post(app, CMPL, {"prompt": "x", "max_tokens": 60}, bearer("sk-a")), 429)
    assert failure["type"] == "tokens" and "request too large" in failure["message"]
    ok = await post(app, CMPL, {"prompt": "x", "max_tokens": 40}, bearer("sk-a"))
    assert ok.status_code == 200
    # 2 tokens were generated of 40 charged: the rest came back.
    prompt_tokens = ok.json()["usage"]["prompt_tokens"]
    remaining = int(ok.headers["x-ratelimit-remaining-tokens"])
    assert 50 - prompt_tokens - 2 <= remaining <= 50 - prompt_tokens - 2 + 1
    refused = await post(app, CMPL, {"prompt": "x", "max_tokens": 49}, bearer("sk-a"))
    assert error(refused, 429)["type"] == "tokens"
    assert refused.headers["x-ratelimit-limit-tokens"] == "50"
    assert int(refused.headers["retry-after"]) >= 1


async def test_max_concurrent_per_key(tmp_path, tokenizer):
    hanging = ScriptedEngineClient(tokenizer, SCRIPT, hang=True)
    path = keys_file(tmp_path, "{name: a, key: sk-a, max_concurrent: 1}")
    app = build_app(hanging, gateway=GatewayConfig(api_keys_file=path))
    first = asyncio.ensure_future(post(app, CMPL, {"prompt": "x", "timeout": 1}, bearer("sk-a")))
    while not hanging.started:
        await asyncio.sleep(0.01)
    failure = error(await post(app, CMPL, {"prompt": "x"}, bearer("sk-a")), 429)
    assert "max_concurrent 1" in failure["message"]
    assert error(await first, 408)["code"] == "deadline_exceeded"
    assert (
        await post(app, CMPL, {"prompt": "y", "timeout": 0.2}, bearer("sk-a"))
    ).status_code == 408


async def test_protected_probes_need_a_key_but_health_never_does(scripted):
    app = build_app(scripted, gateway=GatewayConfig(api_key="sk-a", protect_probes=True))
    for path in ("/metrics", "/ready", "/docs", "/openapi.json", "/dashboard/data"):
        assert (await request(app, "GET", path)).status_code == 401, path
        assert (await request(app, "GET", path, headers=bearer("sk-a"))).status_code == 200, path
    assert (await request(app, "GET", "/health")).status_code == 200
    page = await request(app, "GET", "/dashboard")  # the page holds no data: it asks for a key
    assert page.status_code == 200 and "/dashboard/data" in page.text
    open_app = build_app(scripted, api_key="sk-a")
    assert (await request(open_app, "GET", "/metrics")).status_code == 200


# -- admission, priority, deadlines ---------------------------------------------------------


async def wait_started(client, count: int) -> None:
    while len(client.started) < count:
        await asyncio.sleep(0.005)


async def test_queue_cap_429_then_priority_evicts_the_lowest(tokenizer):
    hanging = ScriptedEngineClient(tokenizer, [], hang=True)
    app = build_app(hanging, gateway=GatewayConfig(max_queued_requests=1))
    low = asyncio.ensure_future(post(app, CMPL, {"prompt": "x", "priority": 5, "timeout": 30}))
    await wait_started(hanging, 1)
    refused = await post(app, CMPL, {"prompt": "x", "priority": 5})
    failure = error(refused, 429)
    assert (failure["type"], failure["code"]) == ("overloaded", "queue_full")
    assert int(refused.headers["retry-after"]) >= 1 and "retry-after-ms" in refused.headers
    urgent = asyncio.ensure_future(post(app, CMPL, {"prompt": "y", "priority": 0, "timeout": 0.3}))
    evicted = await asyncio.wait_for(low, 10)
    assert error(evicted, 429)["code"] == "evicted"
    assert error(await urgent, 408)["code"] == "deadline_exceeded"
    assert hanging.priorities == [5, 0]
    assert set(hanging.aborts) == set(hanging.started)
    assert app.state.gateway.admission.num_queued == 0
    metrics = (await request(app, "GET", "/metrics")).text
    for reason in ("queue_full", "evicted", "deadline"):
        assert f'pdserve:requests_rejected_total{{reason="{reason}"}} 1.0' in metrics


async def test_ttft_admission_refuses_at_once_when_the_queue_is_too_long(tokenizer):
    hanging = ScriptedEngineClient(tokenizer, [], hang=True)
    config = GatewayConfig(admission_ttft_ms=100, admission_prefill_tokens_per_s=1000)
    app = build_app(hanging, gateway=config)
    queued = asyncio.ensure_future(post(app, CMPL, {"prompt": [1] * 150, "timeout": 0.5}))
    await wait_started(hanging, 1)
    refused = await post(app, CMPL, {"prompt": [1] * 10})
    failure = error(refused, 429)
    assert failure["code"] == "ttft_unattainable" and "predicted 160 ms" in failure["message"]
    assert refused.headers["retry-after-ms"] == "60"
    urgent = await post(app, CMPL, {"prompt": [1] * 10, "priority": -1, "timeout": 0.1})
    assert error(urgent, 408)["code"] == "deadline_exceeded"  # admitted, then timed out
    assert error(await queued, 408)["code"] == "deadline_exceeded"


async def test_deadline_mid_stream_ends_with_an_error_event(tokenizer):
    client = ScriptedEngineClient(tokenizer, SCRIPT, hang=True)
    app = build_app(client, gateway=GatewayConfig(request_timeout_s=0.3))
    response = await post(app, CMPL, {"prompt": "x", "stream": True})
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == "Hello"
    assert client.aborts == client.started


async def test_priority_reaches_the_engine_client(scripted):
    app = build_app(scripted)
    await post(app, CHAT, {"messages": [{"role": "user", "content": "x"}], "priority": -3})
    await post(app, CMPL, {"prompt": ["a", "b"], "priority": 7})
    assert scripted.priorities == [-3, 7, 7]
