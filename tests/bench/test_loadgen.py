"""The load generator against a live `pdserve serve` (every arrival mode, both endpoints,
token counts checked against the server's own non-streaming usage) and against small
aiohttp fakes for what a healthy server never does (500s, error events, no usage,
scripted timing)."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from aiohttp import web

from pdserve.bench import metrics
from pdserve.bench.loadgen import Arrival, arrival_times, run_benchmark, run_benchmark_sync
from pdserve.bench.types import SLO, RequestSpec
from pdserve.errors import ConfigError

MAX_TOKENS = 8
PROMPTS = [f"Request {i}: " + "the quick brown fox jumps over " * (i % 3 + 1) for i in range(8)]
# Greedy, and to max_tokens: the same output lengths (and chunks) on every run.
EXTRA_BODY = {"ignore_eos": True, "temperature": 0.0}


def usage_of(url: str, path: str, body: dict) -> dict:
    """The server's usage for a non-streaming request."""
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["usage"]


@pytest.fixture(scope="module")
def prompt_tokens(live_server, live_model) -> list[int]:
    body = {"model": live_model, "max_tokens": 1}
    return [
        usage_of(live_server.url, "/v1/completions", {**body, "prompt": p})["prompt_tokens"]
        for p in PROMPTS
    ]


def completion_specs() -> list[RequestSpec]:
    return [RequestSpec(prompt=p, max_tokens=MAX_TOKENS) for p in PROMPTS]


def check_streamed_run(result, expected_prompt_tokens: list[int]) -> None:
    assert [r.error for r in result.records] == [None] * len(expected_prompt_tokens)
    assert [r.num_prompt_tokens for r in result.records] == expected_prompt_tokens
    assert [r.num_output_tokens for r in result.records] == [MAX_TOKENS] * len(result.records)
    for r in result.records:
        assert r.has_usage
        # One gap per chunk after the first: pdserve sends a token per chunk, but merges
        # the deltas a reader has not taken yet (router/stream_queue.py), so on a busy
        # host a chunk may carry several tokens and there are fewer gaps.
        assert len(r.itl_s) <= MAX_TOKENS - 1
        assert 0 < r.ttft_s <= r.e2e_s
        assert r.ttft_s + sum(r.itl_s) <= r.e2e_s
    summary = metrics.summarize(result, SLO(ttft_ms=1000, tpot_ms=100), price_per_hour=1.0)
    assert summary.num_requests == len(expected_prompt_tokens)
    assert summary.num_errors == 0
    assert 0.0 <= summary.slo_attainment <= 1.0
    assert summary.goodput <= summary.request_throughput
    assert summary.output_throughput * result.duration_s == pytest.approx(MAX_TOKENS * 8)


@pytest.mark.parametrize(
    "arrival",
    [Arrival.poisson(20.0), Arrival.gamma(20.0, burstiness=0.5), Arrival.closed(3)],
    ids=["poisson", "gamma", "concurrency"],
)
def test_arrival_modes_against_live_server(live_server, live_model, prompt_tokens, arrival):
    result = run_benchmark_sync(
        live_server.url,
        live_model,
        completion_specs(),
        arrival,
        num_requests=8,
        extra_body=EXTRA_BODY,
        progress=False,
        seed=1,
    )
    check_streamed_run(result, prompt_tokens)
    assert result.config["arrival"] == arrival.kind
    assert result.config["model"] == live_model


def test_chat_endpoint_against_live_server(live_server, live_model):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    expected = [
        usage_of(
            live_server.url,
            "/v1/chat/completions",
            {"model": live_model, "messages": m, "max_tokens": 1},
        )["prompt_tokens"]
        for m in conversations
    ]
    specs = [RequestSpec(messages=m, max_tokens=MAX_TOKENS) for m in conversations]
    result = run_benchmark_sync(
        live_server.url + "/v1",
        live_model,
        specs,
        Arrival.closed(4),
        num_requests=4,
        endpoint="chat",
        extra_body=EXTRA_BODY,
        progress=False,
    )
    assert [r.num_prompt_tokens for r in result.records] == expected
    assert [r.num_output_tokens for r in result.records] == [MAX_TOKENS] * 4
    assert all(len(r.itl_s) <= MAX_TOKENS - 1 for r in result.records)  # see above


def test_duration_stops_new_sends(live_server, live_model):
    result = run_benchmark_sync(
        live_server.url,
        live_model,
        completion_specs(),
        Arrival.closed(2),
        duration_s=0.5,
        extra_body=EXTRA_BODY,
        progress=False,
    )
    assert len(result.records) >= 2
    assert all(r.start_s < 0.5 for r in result.records)
    assert all(r.is_ok and r.num_output_tokens == MAX_TOKENS for r in result.records)


def test_request_over_the_context_length_is_counted(live_server, live_model):
    too_long = RequestSpec(prompt="Hello", max_tokens=1_000_000)
    specs = [completion_specs()[0], too_long]
    result = run_benchmark_sync(
        live_server.url,
        live_model,
        specs,
        Arrival.poisson(math.inf),
        num_requests=4,
        extra_body=EXTRA_BODY,
        progress=False,
    )
    errors = [r.error for r in result.records]
    assert [e is None for e in errors] == [True, False, True, False]
    assert all(e.startswith("HTTP 400: ") for e in errors[1::2])
    summary = metrics.summarize(result, SLO(ttft_ms=1e6, tpot_ms=1e6))
    assert (summary.num_ok, summary.num_errors, summary.slo_attainment) == (2, 2, 0.5)


# ---- arrivals -------------------------------------------------------------------------


def first(n: int, times) -> np.ndarray:
    return np.array([next(times) for _ in range(n)])


def test_arrival_times_are_seeded():
    a = first(300, arrival_times(Arrival.poisson(5.0), seed=7))
    assert np.array_equal(a, first(300, arrival_times(Arrival.poisson(5.0), seed=7)))
    assert not np.array_equal(a, first(300, arrival_times(Arrival.poisson(5.0), seed=8)))
    assert a[0] == 0.0 and np.all(np.diff(a) > 0)


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_arrival_rate_and_burstiness(burstiness, cv):
    gaps = np.diff(first(20_001, arrival_times(Arrival.gamma(10.0, burstiness), seed=0)))
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)  # mean gap 1/rate
    # Gamma(k): coefficient of variation 1/sqrt(k); Poisson's is 1.
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_infinite_rate_sends_at_once_and_bad_settings_are_refused():
    assert first(3, arrival_times(Arrival.poisson(math.inf))).tolist() == [0.0, 0.0, 0.0]
    for make in (
        lambda: Arrival.poisson(0),
        lambda: Arrival.gamma(1, 0),
        lambda: Arrival.closed(0),
    ):
        with pytest.raises(ConfigError):
            make()
    chat_only = [RequestSpec(messages=[{"role": "user", "content": "hi"}])]
    with pytest.raises(ConfigError, match="try chat"):
        run_benchmark_sync("http://127.0.0.1:9", "m", chat_only, Arrival.closed(1), num_requests=1)
    with pytest.raises(ConfigError, match="number of requests"):
        run_benchmark_sync(
            "http://127.0.0.1:9", "m", completion_specs(), Arrival.poisson(math.inf), duration_s=1
        )


# ---- fake servers ---------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def run_against(handler: Handler, specs, arrival, **kwargs):
    """`run_benchmark` against an aiohttp app serving `handler` on both endpoints."""

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            return await run_benchmark(url, "fake", specs, arrival, progress=False, **kwargs)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def streamer(texts: list[str], gap_s: float = 0.0, usage: dict | None = None, tail: str = ""):
    """A handler streaming `texts` as completion chunks, `gap_s` apart, then usage."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text in texts:
            await asyncio.sleep(gap_s)
            event = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        if usage is not None:
            await response.write(
                f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            )
        await response.write((tail or "data: [DONE]\n\n").encode())
        return response

    return handle


SPEC = [RequestSpec(prompt="hi", max_tokens=3)]


def test_chunk_timing_and_usage_from_a_scripted_stream():
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    # An empty chunk (a held-back partial character) is not a token.
    handler = streamer(["a", "", "b", "c"], gap_s=0.05, usage=usage)
    result = run_against(handler, SPEC, Arrival.closed(1), num_requests=1)
    (record,) = result.records
    assert (record.error, record.num_prompt_tokens, record.num_output_tokens) == (None, 11, 3)
    assert record.ttft_s >= 0.05
    assert len(record.itl_s) == 2
    assert record.itl_s[0] >= 0.1 and record.itl_s[1] >= 0.05  # the empty chunk's gap included
    assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 2)


def test_http_500_is_counted_not_raised():
    async def fail(request):
        return web.json_response({"error": {"message": "boom", "type": "server"}}, status=500)

    result = run_against(fail, SPEC, Arrival.poisson(100.0), num_requests=5)
    assert [r.error for r in result.records] == ["HTTP 500: boom"] * 5
    assert metrics.summarize(result, SLO(1e6, 1e6)).num_errors == 5


def test_error_event_mid_stream_is_counted():
    tail = 'data: {"error": {"message": "worker lost", "code": 500}}\n\ndata: [DONE]\n\n'
    result = run_against(streamer(["a", "b"], tail=tail), SPEC, Arrival.closed(2), num_requests=2)
    assert [r.error for r in result.records] == ["error event: worker lost"] * 2


def test_server_without_usage_is_flagged():
    result = run_against(streamer(["a", "b", "c"]), SPEC, Arrival.closed(1), num_requests=3)
    assert [(r.is_ok, r.has_usage, r.num_output_tokens) for r in result.records] == [
        (True, False, 0)
    ] * 3
    assert metrics.summarize(result).num_without_usage == 3


def test_stream_without_text_is_an_error():
    usage = {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}
    result = run_against(streamer([], usage=usage), SPEC, Arrival.closed(1), num_requests=1)
    assert result.records[0].error == "the stream ended without any text"


def test_refused_connection_is_counted():
    result = run_benchmark_sync(
        "http://127.0.0.1:9", "m", SPEC, Arrival.poisson(math.inf), num_requests=3, progress=False
    )
    assert len(result.records) == 3
    assert all(r.error.startswith("ClientConnectorError") for r in result.records)


def test_trace_and_poisson_sends_keep_their_schedule():
    trace = [RequestSpec(prompt="x", max_tokens=1, timestamp_s=t) for t in (0.0, 0.15, 0.3)]
    handler = streamer(["a"], usage={"prompt_tokens": 1, "completion_tokens": 1})
    result = run_against(handler, trace, Arrival.trace())
    assert_on_schedule([r.start_s for r in result.records], [0.0, 0.15, 0.3])
    result = run_against(handler, SPEC, Arrival.poisson(20.0), num_requests=6, seed=5)
    expected = first(6, arrival_times(Arrival.poisson(20.0), seed=5))
    assert_on_schedule([r.start_s for r in result.records], expected.tolist())


def assert_on_schedule(starts: list[float], times: list[float]) -> None:
    """Each request left at its time: never early, and not held back behind the others
    (late only by the host's scheduling, which on a loaded CI host reached tens of ms)."""
    assert len(starts) == len(times)
    for start, at in zip(starts, times, strict=True):
        assert at - 1e-3 <= start < at + 0.5


def test_api_key_and_extra_body_are_sent():
    seen = []

    async def handle(request):
        seen.append((request.headers.get("Authorization"), await request.json()))
        return await streamer(["a"])(request)

    run_against(
        handle,
        SPEC,
        Arrival.closed(1),
        num_requests=1,
        api_key="k",
        extra_body={"ignore_eos": True},
    )
    auth, body = seen[0]
    assert auth == "Bearer k"
    assert body == {
        "model": "fake",
        "prompt": "hi",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def test_a_session_turn_waits_for_the_previous_turn():
    specs = [
        RequestSpec(prompt="a1", max_tokens=2, session_id="a"),
        RequestSpec(prompt="b1", max_tokens=2, session_id="b"),
        RequestSpec(prompt="a1 a2", max_tokens=2, session_id="a"),
    ]
    handler = streamer(["x", "y"], gap_s=0.05, usage={"prompt_tokens": 2, "completion_tokens": 2})
    result = run_against(handler, specs, Arrival.poisson(math.inf), num_requests=3)
    a1, b1, a2 = result.records
    assert b1.start_s < a1.start_s + a1.e2e_s  # another session's turn does not wait
    assert a2.start_s >= a1.start_s + a1.e2e_s


def test_every_request_gets_a_fresh_connection_and_token_id_prompts_pass_through():
    """Some servers (llama-server) close kept-alive connections between responses; reusing
    one made requests fail, so each request opens its own connection."""
    peers, prompts = [], []

    async def handle(request):
        peers.append(request.transport.get_extra_info("peername"))
        prompts.append((await request.json())["prompt"])
        return await streamer(["a"], usage={"prompt_tokens": 3, "completion_tokens": 1})(request)

    specs = [RequestSpec(prompt=[5, 6, 7], max_tokens=1)]
    result = run_against(handle, specs, Arrival.closed(1), num_requests=4)
    assert [r.error for r in result.records] == [None] * 4
    assert len(peers) == 4 and len(set(peers)) == 4  # four client ports: four connections
    assert prompts == [[5, 6, 7]] * 4
