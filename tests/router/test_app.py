"""The HTTP app end to end over an in-process engine: answers equal the offline API's,
streams are framed like OpenAI's, errors carry OpenAI bodies, and a client that hangs up
leaves no request running and no block taken."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import httpx2 as httpx
import pytest

from pdserve import SamplingParams
from pdserve.errors import RequestFailedError
from pdserve.router.app import build_app
from pdserve.router.metrics import RouterMetrics
from tests.router.fakes import ScriptedEngineClient, call_and_hang_up

pytestmark = pytest.mark.anyio

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = "Hello world"
USER = [{"role": "user", "content": "Say something"}]
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


async def post(app, path: str, body: dict | str, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.post(path, content=content, headers=headers)


async def get(app, path: str, headers: dict | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.get(path, headers=headers)


def events(response: httpx.Response) -> list:
    """The SSE payloads of a stream, `"[DONE]"` kept as a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\n\n")
    payloads = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def plain_usage(usage: dict) -> dict:
    """The token counts of a usage object; its cache details must be well formed."""
    usage = dict(usage)
    details = usage.pop("prompt_tokens_details")
    assert 0 <= details["cached_tokens"] < usage["prompt_tokens"]
    return usage


def reference(llm, prompt, **params) -> list:
    """The offline API's outputs (one `CompletionOutput` per sample) for one prompt."""
    if isinstance(prompt, list):
        prompt = {"prompt_token_ids": prompt}
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


@pytest.fixture
def app(engine_client):
    return build_app(engine_client)


@pytest.fixture
def tokenizer(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(builtin_model_dir)


async def assert_engine_idle(engine_client) -> None:
    snapshot = await engine_client.snapshot()
    assert not snapshot.has_unfinished_requests
    assert snapshot.num_tracked_requests == 0
    assert snapshot.num_free_blocks == snapshot.num_blocks


# -- completions ----------------------------------------------------------------------------


async def test_completion_equals_offline_greedy(app, reference_llm):
    expected = reference(reference_llm, PROMPT, **GREEDY, logprobs=2)
    response = await post(app, CMPL, {"prompt": PROMPT, **GREEDY, "logprobs": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "pdserve-tiny"
    (choice,) = body["choices"]
    assert choice["text"] == expected.outputs[0].text
    assert (choice["index"], choice["finish_reason"]) == (0, "length")
    num_prompt = len(expected.prompt_token_ids)
    assert plain_usage(body["usage"]) == {
        "prompt_tokens": num_prompt,
        "completion_tokens": 8,
        "total_tokens": num_prompt + 8,
    }
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    sample = expected.outputs[0]
    want = [lp[t].logprob for t, lp in zip(sample.token_ids, sample.logprobs, strict=True)]
    assert logprobs["token_logprobs"] == pytest.approx(want, abs=1e-5)
    offsets = [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(8)]
    assert logprobs["text_offset"] == offsets
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert 2 <= len(top) <= 3 and top[token] == max(top.values())  # greedy: the best


async def test_completion_stream_equals_offline(app, reference_llm, engine_client):
    expected = reference(reference_llm, PROMPT, **GREEDY).outputs[0]
    response = await post(app, CMPL, {"prompt": PROMPT, **GREEDY, "stream": True})
    *chunks, done = events(response)
    assert done == "[DONE]"
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons == [None] * (len(chunks) - 1) + ["length"]
    await assert_engine_idle(engine_client)


async def test_batch_of_prompts_with_n_samples(app, reference_llm, engine_client):
    prompts = [PROMPT, "def f(x):"]
    params = {"temperature": 0.8, "seed": 5, "n": 2, "max_tokens": 6, "ignore_eos": True}
    response = await post(app, CMPL, {"prompt": prompts, **params})
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # prompt * n + sample
    expected = [reference(reference_llm, p, **params) for p in prompts]
    texts = [s.text for e in expected for s in e.outputs]
    assert [c["text"] for c in body["choices"]] == texts
    assert texts[0] != texts[1] and texts[2] != texts[3]  # seeded samples differ
    num_prompt = sum(len(e.prompt_token_ids) for e in expected)
    assert plain_usage(body["usage"]) == {
        "prompt_tokens": num_prompt,
        "completion_tokens": 24,
        "total_tokens": num_prompt + 24,
    }
    # The same prompts as token ids, streamed: the same four texts.
    token_prompts = [e.prompt_token_ids for e in expected]
    stream = await post(app, CMPL, {"prompt": token_prompts, **params, "stream": True})
    joined = ["", "", "", ""]
    for chunk in events(stream)[:-1]:
        (choice,) = chunk["choices"]
        joined[choice["index"]] += choice["text"]
    assert joined == texts


async def test_seed_makes_sampling_reproducible(app):
    body = {"prompt": PROMPT, "temperature": 1.0, "max_tokens": 8, "ignore_eos": True}
    first, again, other = [
        (await post(app, CMPL, {**body, "seed": s})).json()["choices"][0]["text"] for s in (7, 7, 8)
    ]
    assert first == again and first != other


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_ends_text_before_it(app, reference_llm, stream):
    full = reference(reference_llm, PROMPT, **GREEDY).outputs[0].text
    stop = full[4:8]  # inside the text, so generation meets it
    expected = full[: full.index(stop)]
    body = {"prompt": PROMPT, **GREEDY, "stop": [stop], "stream": stream}
    response = await post(app, CMPL, body)
    if stream:
        *chunks, _ = events(response)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        finish_reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        (choice,) = response.json()["choices"]
        text, finish_reason = choice["text"], choice["finish_reason"]
    assert (text, finish_reason) == (expected, "stop")


async def test_echo_prepends_the_prompt(app, reference_llm):
    expected = reference(reference_llm, PROMPT, **GREEDY).outputs[0].text
    response = await post(app, CMPL, {"prompt": PROMPT, **GREEDY, "echo": True})
    assert response.json()["choices"][0]["text"] == PROMPT + expected
    stream = await post(app, CMPL, {"prompt": PROMPT, **GREEDY, "echo": True, "stream": True})
    *chunks, _ = events(stream)
    assert chunks[0]["choices"][0]["text"].startswith(PROMPT)
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT + expected


# -- chat -----------------------------------------------------------------------------------


async def test_chat_equals_offline_chat(app, reference_llm, engine_client):
    expected = reference_llm.chat(USER, SamplingParams(**GREEDY), use_tqdm=False)[0]
    bos = engine_client.tokenizer.bos_token_id
    assert expected.prompt_token_ids[:2].count(bos) == 1  # the template's BOS, not two
    body = {"messages": USER, "max_completion_tokens": 8, "max_tokens": 3}
    response = await post(app, CHAT, {**GREEDY, **body})
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.outputs[0].text}
    assert (choice["finish_reason"], choice["logprobs"]) == ("length", None)
    num_prompt = len(expected.prompt_token_ids)
    assert plain_usage(body["usage"]) == {
        "prompt_tokens": num_prompt,
        "completion_tokens": 8,
        "total_tokens": num_prompt + 8,
    }


async def test_chat_stream_with_usage_and_n(app, reference_llm):
    params = {"temperature": 0.7, "seed": 3, "n": 2, "max_tokens": 5, "ignore_eos": True}
    expected = reference_llm.chat(USER, SamplingParams(**params), use_tqdm=False)[0]
    body = {"messages": USER, **params, "stream": True, "stream_options": {"include_usage": True}}
    *chunks, usage_chunk, done = events(await post(app, CHAT, body))
    assert done == "[DONE]"
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    contents, finishes = ["", ""], [[], []]
    for chunk in chunks[2:]:
        assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
        (choice,) = chunk["choices"]
        contents[choice["index"]] += choice["delta"].get("content", "")
        finishes[choice["index"]].append(choice["finish_reason"])
    assert contents == [s.text for s in expected.outputs]
    assert [f[-1] for f in finishes] == ["length", "length"]
    assert all(f.count("length") == 1 for f in finishes)
    num_prompt = len(expected.prompt_token_ids)
    assert usage_chunk["choices"] == []
    assert plain_usage(usage_chunk["usage"]) == {
        "prompt_tokens": num_prompt,
        "completion_tokens": 10,
        "total_tokens": num_prompt + 10,
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_logprobs_shape(app, stream):
    body = {"messages": USER, **GREEDY, "logprobs": True, "top_logprobs": 2, "stream": stream}
    response = await post(app, CHAT, body)
    if stream:
        chunks = [c["choices"][0] for c in events(response)[1:-1]]
        content = [e for c in chunks for e in (c["logprobs"] or {"content": []})["content"]]
        text = "".join(c["delta"].get("content", "") for c in chunks)
    else:
        (choice,) = response.json()["choices"]
        content, text = choice["logprobs"]["content"], choice["message"]["content"]
    assert len(content) == 8
    assert "".join(entry["token"] for entry in content) == text
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        best = entry["top_logprobs"][0]
        assert (best["token"], best["logprob"]) == (entry["token"], entry["logprob"])
        assert entry["top_logprobs"][1]["logprob"] <= best["logprob"]


# -- errors ---------------------------------------------------------------------------------


def error(response: httpx.Response, status_code: int) -> dict:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


BAD_ROLE = [{"role": "bot", "content": "x"}]
USAGE = {"include_usage": True}
TYPE_400 = "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        (CMPL, '{"prompt": ', None, "could not parse the JSON body"),
        (CMPL, "[1, 2]", None, "should be an object"),
        (CMPL, {"max_tokens": 3}, "prompt", "Field required"),
        (CMPL, {"prompt": PROMPT, "temperature": "hot"}, "temperature", "valid number"),
        (CMPL, {"prompt": [1, "a"]}, "prompt", "valid string"),
        (CHAT, {"messages": BAD_ROLE}, "messages[0].role", "'user'"),
        (CMPL, {"prompt": PROMPT, "temperature": -1}, "temperature", "must be >= 0"),
        (CMPL, {"prompt": PROMPT, "max_tokens": 300}, "max_tokens", "context length of 256"),
        (CMPL, {"prompt": list(range(5, 261))}, "prompt", "no room to generate"),
        (CMPL, {"prompt": PROMPT, "echo": True, "logprobs": 1}, "echo", "not supported"),
        (CHAT, {"messages": USER, "stream_options": USAGE}, "stream_options", "only allowed"),
    ],
)
async def test_bad_requests_are_400_before_any_work(
    app, engine_client, path, body, param, fragment
):
    num_aborts = len(engine_client.aborts)
    failure = error(await post(app, path, body), 400)
    assert (failure["type"], failure["param"], failure["code"]) == (TYPE_400, param, None)
    assert fragment in failure["message"]
    assert len(engine_client.aborts) == num_aborts
    await assert_engine_idle(engine_client)


async def test_one_bad_prompt_in_a_batch_starts_none(app, engine_client):
    body = {"prompt": [[1, 2, 3], list(range(5, 300))], "max_tokens": 4}
    assert error(await post(app, CMPL, body), 400)["param"] == "prompt"
    await assert_engine_idle(engine_client)


async def test_unknown_model_is_404(app):
    failure = error(await post(app, CHAT, {"model": "gpt-9", "messages": USER}), 404)
    assert failure == {
        "message": "The model `gpt-9` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    named = await post(app, CMPL, {"model": "pdserve-tiny", "prompt": PROMPT, "max_tokens": 1})
    assert named.status_code == 200


async def test_unknown_route_is_openai_shaped_404(app):
    failure = error(await get(app, "/v1/engines"), 404)
    assert failure["message"] == "Invalid URL (GET /v1/engines)"
    assert error(await get(app, CMPL), 405)["type"] == "invalid_request_error"


async def test_service_unavailable_is_503(tokenizer):
    client = ScriptedEngineClient(tokenizer, unavailable=True)
    app = build_app(client)
    ready = await get(app, "/ready")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "reason": "no decode worker is alive", "workers": []}
    assert (await get(app, "/health")).status_code == 200
    for stream in (False, True):
        body = {"prompt": PROMPT, "stream": stream}
        failure = error(await post(app, CMPL, body), 503)
        assert failure["message"] == "no decode worker is alive"
        assert (failure["type"], failure["code"]) == ("server_error", "service_unavailable")


@pytest.mark.parametrize("stream", [False, True])
async def test_failure_before_the_first_update_is_503_and_retryable(tokenizer, stream):
    # Nothing was produced (overload, e.g. "prefill did not finish in time", or a lost
    # worker), so a retry is safe: 503 with Retry-After, never a 500.
    client = ScriptedEngineClient(tokenizer, fail_with=RequestFailedError("worker w1 died"))
    response = await post(build_app(client), CMPL, {"prompt": PROMPT, "stream": stream})
    failure = error(response, 503)
    assert failure["message"] == "worker w1 died; retry later"
    assert (failure["type"], failure["code"]) == ("server_error", "service_unavailable")
    assert response.headers["retry-after"] == "1"
    assert client.aborts == client.started


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (RequestFailedError("KV transfer timed out"), "KV transfer timed out"),
        (KeyError("secret"), "internal server error"),
    ],
)
async def test_failure_mid_stream_sends_error_event_then_done(tokenizer, caplog, exc, message):
    client = ScriptedEngineClient(tokenizer, [("He", [10]), ("llo", [11])], fail_with=exc)
    body = {"messages": USER, "stream": True}
    with caplog.at_level(logging.ERROR, logger="pdserve.router"):
        response = await post(build_app(client), CHAT, body)
    assert response.status_code == 200
    *chunks, failure, done = events(response)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "He"},
        {"content": "llo"},
    ]
    assert failure == {
        "error": {"message": message, "type": "server_error", "param": None, "code": None}
    }
    assert done == "[DONE]"
    assert client.aborts == client.started  # the unfinished request was aborted
    assert ("secret" in caplog.text) == isinstance(exc, KeyError)  # traceback logged


async def test_unexpected_error_is_a_generic_500(tokenizer, caplog):
    client = ScriptedEngineClient(tokenizer, fail_with=ZeroDivisionError("do not show me"))
    with caplog.at_level(logging.ERROR, logger="pdserve.router"):
        failure = error(await post(build_app(client), CMPL, {"prompt": PROMPT}), 500)
    assert failure == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert "ZeroDivisionError: do not show me" in caplog.text


# -- disconnects ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("prompt", [PROMPT, [PROMPT, "def f(x):"]])
async def test_client_hanging_up_mid_stream_aborts(app, engine_client, spec_version, prompt):
    body = {"prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def after_three_chunks(result):
        return len(result.chunks) >= 3

    result = await call_and_hang_up(
        app,
        CMPL,
        json.dumps(body).encode(),
        hang_up=after_three_chunks,
        spec_version=spec_version,
        on_return=lambda: list(engine_client.aborts),
    )
    request_id = json.loads(result.chunks[0].decode().removeprefix("data: "))["id"]
    assert result.status_code == 200
    assert b"[DONE]" not in b"".join(result.chunks)
    # Aborted by the time the app returned, not later when the generator is collected.
    num_prompts = len(prompt) if isinstance(prompt, list) else 1
    expected = [f"{request_id}-{i}" for i in range(num_prompts)]
    assert sorted(result.on_return[-num_prompts:]) == expected
    await assert_engine_idle(engine_client)


async def test_client_hanging_up_while_waiting_aborts(app, engine_client):
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
    num_aborts = len(engine_client.aborts)

    async def once_running(result):
        return engine_client.engine.has_unfinished_requests()

    result = await call_and_hang_up(
        app,
        CMPL,
        json.dumps(body).encode(),
        hang_up=once_running,
        on_return=lambda: engine_client.aborts[num_aborts:],
    )
    assert result.status_code == 499
    (aborted,) = result.on_return
    assert aborted.startswith("cmpl-") and aborted.endswith("-0")
    await assert_engine_idle(engine_client)


# -- auth, probes, models, metrics ----------------------------------------------------------


async def test_api_key_guards_v1_only(engine_client):
    app = build_app(engine_client, api_key="s3cret")
    missing = error(await get(app, "/v1/models"), 401)
    assert (missing["type"], missing["code"]) == ("invalid_request_error", None)
    wrong = await get(app, "/v1/models", headers={"Authorization": "Bearer nope"})
    assert error(wrong, 401)["code"] == "invalid_api_key"
    assert wrong.headers["www-authenticate"] == "Bearer"
    body = {"prompt": PROMPT, "max_tokens": 1}
    basic = await post(app, CMPL, body, {"Authorization": "Basic s3cret"})
    assert error(basic, 401)["code"] == "invalid_api_key"
    good = await post(app, CMPL, body, {"Authorization": "Bearer s3cret"})
    assert good.status_code == 200
    for path in ("/health", "/ready", "/metrics"):
        assert (await get(app, path)).status_code == 200


async def test_models_health_and_ready(app):
    models = (await get(app, "/v1/models")).json()
    (card,) = models["data"]
    assert models["object"] == "list"
    assert (card["id"], card["object"], card["max_model_len"]) == ("pdserve-tiny", "model", 256)
    assert (await get(app, "/health")).json() == {"status": "ok"}
    ready = (await get(app, "/ready")).json()
    assert ready["ready"] is True
    assert [w["worker_id"] for w in ready["workers"]] == ["inproc-0"]


async def test_metrics_count_a_request(engine_client):
    app = build_app(engine_client, RouterMetrics("pdserve-tiny"))
    response = await post(app, CMPL, {"prompt": PROMPT, **GREEDY})
    num_prompt = response.json()["usage"]["prompt_tokens"]
    text = (await get(app, "/metrics")).text
    label = '{model_name="pdserve-tiny"}'
    for line in (
        f"vllm:time_to_first_token_seconds_count{label} 1.0",
        f"vllm:inter_token_latency_seconds_count{label} 7.0",
        f"vllm:time_per_output_token_seconds_count{label} 7.0",
        f"vllm:e2e_request_latency_seconds_count{label} 1.0",
        f"vllm:prompt_tokens_total{label} {float(num_prompt)}",
        f"vllm:generation_tokens_total{label} 8.0",
        'vllm:request_success_total{finished_reason="length",model_name="pdserve-tiny"} 1.0',
        'vllm:num_requests_running{model_name="pdserve-tiny",role="mixed",worker="inproc-0"} 0.0',
        'vllm:kv_cache_usage_perc{model_name="pdserve-tiny",role="mixed",worker="inproc-0"} 0.0',
    ):
        assert line in text.splitlines()


def test_app_module_does_not_import_torch():
    code = "import sys, pdserve.router.app; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


async def test_usage_reports_prefix_cache_hits(app, engine_client):
    """The second identical prompt is served from the prefix cache: every full block but
    the one holding the last token (which must be computed for the next logits)."""
    prompt = " ".join(f"w{i}" for i in range(40))  # within max_model_len 256
    body = {"prompt": prompt, **GREEDY}
    first = (await post(app, CMPL, body)).json()["usage"]
    second = (await post(app, CMPL, body)).json()["usage"]
    num_prompt = first["prompt_tokens"]
    assert num_prompt > 32
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    block_size = 16
    expected = (num_prompt - 1) // block_size * block_size
    assert second["prompt_tokens_details"] == {"cached_tokens": expected}
    await assert_engine_idle(engine_client)
