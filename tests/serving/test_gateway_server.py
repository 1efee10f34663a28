"""The gateway in front of a real `pdserve serve` (disaggregated: one prefill and one
decode worker, keys file, admission queue cap, default deadline): the request that once
killed a worker is a 400, hostile bodies from the fuzzer never get a 5xx nor kill a
worker, and greedy output afterwards is what it was before."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.router.gateway.bodies import chat_bodies, completion_bodies, raw_json
from tests.serving.server import ServerProcess

KEY = "sk-fuzz-1"
ALLOWED = {200, 400, 401, 404, 408, 413, 429}
GREEDY = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 8, "ignore_eos": True}
LIVE = settings(
    max_examples=40,  # per endpoint: a short run; the in-process fuzz does the volume
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: fuzz, key: {KEY}, max_concurrent: 8}}\n")
    s = ServerProcess(
        "--mode",
        "disaggregated",
        "--threads-per-worker",
        "1",
        "--max-model-len",
        "512",
        "--api-keys",
        str(keys),
        "--max-queued-requests",
        "32",
        "--request-timeout-s",
        "60",
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def before(server, http):
    """Greedy output and worker processes before any hostile request."""
    response = http.post("/v1/completions", json=GREEDY)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"], sorted(server.worker_pids())


def check(response: httpx.Response) -> None:
    assert response.status_code in ALLOWED, (response.status_code, response.text)
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        for event in response.text.split("\n\n")[:-2]:
            payload = json.loads(event.removeprefix("data: "))
            assert payload.get("error", {}).get("type") != "server_error", payload


def test_the_request_that_killed_a_worker_is_a_400(http, before):
    raw = '{"prompt": "Hello", "temperature": 1e400, "min_tokens": 2, "max_tokens": 4}'
    response = http.post("/v1/completions", content=raw)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "temperature"
    for raw, param in [
        ('{"prompt": "x", "seed": 1208925819614629174706176}', "seed"),
        ('{"prompt": "x", "top_k": 1e20}', "top_k"),
        ('{"prompt": "x", "n": 100000}', "n"),
        ('{"prompt": "x", "temperature": 1e39, "min_tokens": 1}', "temperature"),
    ]:
        response = http.post("/v1/completions", content=raw)
        assert (response.status_code, response.json()["error"]["param"]) == (400, param)


def test_no_key_no_service(server):
    response = httpx.post(server.url + "/v1/completions", json=GREEDY, timeout=30)
    assert response.status_code == 401


@LIVE
@given(raw=raw_json(completion_bodies()))
def test_fuzz_live_completions(http, before, raw):
    check(http.post("/v1/completions", content=raw))


@LIVE
@given(raw=raw_json(chat_bodies()))
def test_fuzz_live_chat(http, before, raw):
    check(http.post("/v1/chat/completions", content=raw))


def test_after_fuzzing_same_workers_same_greedy_output(server, http, before):
    text, pids = before
    assert sorted(server.worker_pids()) == pids  # none died, none was restarted
    assert http.get("/ready").status_code == 200
    response = http.post("/v1/completions", json=GREEDY)
    assert response.json()["choices"][0]["text"] == text
    metrics = http.get("/metrics").text
    assert 'pdserve:key_requests_total{key_name="fuzz"}' in metrics
    assert "pdserve:admission_queued_requests 0.0" in metrics
