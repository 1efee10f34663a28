"""Property-based fuzzing of both generation endpoints against the in-process engine
(a real engine, scheduler and sampler in a thread): whatever the body, the answer is not
a 5xx, every error is OpenAI-shaped, nothing leaks, and greedy output afterwards is what
it was before."""

from __future__ import annotations

import asyncio
import json

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings

from pdserve import SamplingParams
from pdserve.router.app import build_app
from tests.router.gateway.bodies import (
    EDGE_INTS,
    VALID_SAMPLING,
    chat_bodies,
    completion_bodies,
    raw_json,
)

EXAMPLES = 150  # per endpoint: ~20 s together on the shared 2-core machines
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run and machine: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
ALLOWED = {200, 400, 401, 404, 408, 413, 429}


async def _post(app, path: str, raw: str) -> httpx.Response:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.post(path, content=raw, timeout=60)


def check_answer(response: httpx.Response) -> None:
    """Not a 5xx; errors and stream error events OpenAI-shaped and not server errors."""
    assert response.status_code in ALLOWED, (response.status_code, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            payload = json.loads(event)
            assert payload.get("error", {}).get("type") != "server_error", payload
    else:
        assert response.json()["choices"]


@pytest.fixture(scope="module")
def fuzz_app(engine_client):
    return build_app(engine_client)


def greedy_text(app) -> str:
    response = asyncio.run(_post(app, "/v1/completions", json.dumps({"prompt": "Hi", **GREEDY})))
    assert response.status_code == 200
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def before(fuzz_app) -> str:
    return greedy_text(fuzz_app)


@FUZZ
@given(raw=raw_json(completion_bodies()))
def test_fuzz_completions(fuzz_app, before, raw):
    check_answer(asyncio.run(_post(fuzz_app, "/v1/completions", raw)))


@FUZZ
@given(raw=raw_json(chat_bodies()))
def test_fuzz_chat(fuzz_app, before, raw):
    check_answer(asyncio.run(_post(fuzz_app, "/v1/chat/completions", raw)))


GRID_BASE = {"max_tokens": 3, "min_tokens": 1, "n": 2, "seed": 1}
GRID_FIELDS = [*VALID_SAMPLING, "logprobs", "top_logprobs", "max_completion_tokens"]
GRID_POISONS = [
    "1e400",
    "-1e400",
    "NaN",
    "1e308",
    "-1e308",
    "1e20",
    "-1",
    "0",
    *map(str, EDGE_INTS),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_every_field_poisoned_alone(fuzz_app, before, path):
    """Exhaustive where the random search is thin: each field of an otherwise valid body
    (min_tokens set, as in the request that once killed a worker) set to each extreme."""
    if path == "/v1/completions":
        base = {**GRID_BASE, "prompt": "Hi"}
    else:
        base = {**GRID_BASE, "messages": [{"role": "user", "content": "Hi"}]}
    for name in GRID_FIELDS:
        for poison in GRID_POISONS:
            body = json.dumps({**base, name: "@"}).replace('"@"', poison)
            check_answer(asyncio.run(_post(fuzz_app, path, body)))


def test_after_fuzzing_nothing_leaked_and_greedy_output_is_unchanged(
    fuzz_app, engine_client, reference_llm, before
):
    snapshot = asyncio.run(engine_client.snapshot())
    assert not snapshot.has_unfinished_requests and snapshot.num_tracked_requests == 0
    assert snapshot.num_free_blocks == snapshot.num_blocks
    assert greedy_text(fuzz_app) == before
    expected = reference_llm.generate("Hi", SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert before == expected.outputs[0].text
    gateway = fuzz_app.state.gateway
    assert gateway.admission.num_queued == 0
