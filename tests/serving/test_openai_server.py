"""The official `openai` client against a live `pdserve serve` (auto mode, one prefill and
one decode worker, API key set), checked token-for-token against the offline engine.

Prompts longer than `--auto-local-prefill-tokens 32` are prefilled remotely, shorter ones
on the decode worker; `--max-num-batched-tokens 64` makes long prompts take several chunks.
"""

from __future__ import annotations

import json
import time

import httpx2 as httpx
import openai
import pytest

from pdserve import LLM, SamplingParams
from tests.serving.server import ServerProcess

API_KEY = "test-key-123"
LONG_PROMPT = " ".join(f"item{i} = compute(item{i - 1}) + {i};" for i in range(1, 40))
SHORT_PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def server(builtin_model_dir):
    s = ServerProcess(
        "--batch-invariant",  # outputs are compared with the offline engine's, exactly
        "--threads-per-worker",
        "1",
        "--max-num-batched-tokens",
        "64",
        "--auto-local-prefill-tokens",
        "32",
        env={"PDSERVE_API_KEY": API_KEY},
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(builtin_model_dir) -> LLM:
    return LLM(str(builtin_model_dir), num_threads=1, num_kv_blocks=256, batch_invariant=True)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.mark.parametrize("prompt", [SHORT_PROMPT, LONG_PROMPT], ids=["local", "remote"])
def test_completion_matches_offline_engine(client, offline, model, prompt):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = offline.generate([prompt], params)[0].outputs[0].text
    result = client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 16
    assert result.usage.prompt_tokens == len(offline.engine.tokenizer.encode(prompt))


@pytest.mark.parametrize("prompt", [SHORT_PROMPT, LONG_PROMPT], ids=["local", "remote"])
def test_streamed_completion_equals_non_streamed(client, model, prompt):
    kwargs = dict(model=model, prompt=prompt, max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_stream_with_usage(client, offline, model):
    messages = [{"role": "user", "content": LONG_PROMPT}]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = offline.chat(messages, params)[0].outputs[0].text
    whole = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_samples_seeded_reproducible(client, model):
    kwargs = dict(model=model, prompt=LONG_PROMPT, max_tokens=8, temperature=1.0, n=3, seed=42)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3  # three different samples
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert first.usage.completion_tokens == 24


def test_stop_string(client, model):
    kwargs = dict(model=model, prompt=LONG_PROMPT, max_tokens=24, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[8:11]
    cut = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"


def test_errors_are_openai_shaped(client, server, model):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(
        server.url + "/v1/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200


def _kv_usage(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    usage = {}
    for line in text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc{"):
            usage[line.split('worker="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return usage


def test_disconnect_mid_stream_frees_blocks(server, model):
    body = {
        "model": model,
        "prompt": LONG_PROMPT,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        received = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                received.append(json.loads(line[6:]))
            if len(received) == 3:
                break
    assert len(received) == 3
    deadline = time.monotonic() + 10
    usage = _kv_usage(server)
    while any(usage.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
        usage = _kv_usage(server)
    assert usage and not any(usage.values()), usage
