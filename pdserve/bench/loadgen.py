"""The load generator of `pdserve bench`: streams requests at an OpenAI-compatible server
and measures each one.

- `Arrival`: when requests are sent — Poisson at a rate, gamma with a burstiness, a fixed
  concurrency (closed loop), or the timestamps of a trace.
- `arrival_times(arrival, seed)`: the open-loop send offsets, reproducible from the seed.
- `run_benchmark(url, model, specs, arrival, ...)` (and `run_benchmark_sync`): send the
  requests, return a `RunResult` with one `RequestRecord` per request, in send order.
- `fetch_model_id(url)`: the first model a server lists, for when none is given.

Contract: every request is sent to `/v1/completions` (`RequestSpec.prompt`) or
`/v1/chat/completions` (`RequestSpec.messages`) with `stream: true` and
`stream_options.include_usage`; a turn of a session (`session_id`) waits for the end of
the session's previous turn. TTFT is the time from sending to the first chunk that
carries text; each later text chunk adds one inter-token gap; E2E ends with the stream.
Token counts come only from the server's final `usage` chunk: a server that sends none
gets 0 and `has_usage=False` (the summary flags it) — never a count guessed from chunks,
which can hold several tokens or none. A failed request (HTTP error, error event in the
stream, refused connection, timeout) is recorded with its error and the run goes on.

Why this way: one asyncio task per request on one aiohttp session keeps the client's own
overhead far below the server's latencies even at thousands of requests in flight, and
timestamps are taken as lines arrive, so they are what a real client would see.
Server-specific fields (`ignore_eos`, `temperature`) are opt-in through `extra_body`,
because strict servers reject fields they do not know.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.bench.types import RequestRecord, RequestSpec, RunResult
from pdserve.errors import ConfigError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ARRIVAL_KINDS = ("poisson", "gamma", "concurrency", "trace")
DEFAULT_REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Arrival:
    """When requests are sent; build one with the class methods."""

    kind: str  # poisson | gamma | concurrency | trace
    rate: float | None = None  # requests/s (poisson, gamma); inf sends all at once
    burstiness: float = 1.0  # gamma shape: 1 is Poisson, < 1 burstier, > 1 steadier
    concurrency: int | None = None  # closed loop: requests in flight at all times

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ConfigError("arrival", f"{self.kind!r} is not one of {ARRIVAL_KINDS}")
        if self.kind in ("poisson", "gamma") and not (self.rate and self.rate > 0):
            raise ConfigError("rate", f"must be > 0, got {self.rate}")
        if self.burstiness <= 0:
            raise ConfigError("burstiness", f"must be > 0, got {self.burstiness}")
        if self.kind == "concurrency" and not (self.concurrency and self.concurrency > 0):
            raise ConfigError("concurrency", f"must be > 0, got {self.concurrency}")

    @classmethod
    def poisson(cls, rate: float) -> Arrival:
        return cls("poisson", rate=rate)

    @classmethod
    def gamma(cls, rate: float, burstiness: float) -> Arrival:
        """vLLM's definition: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness))."""
        return cls("gamma", rate=rate, burstiness=burstiness)

    @classmethod
    def closed(cls, concurrency: int) -> Arrival:
        return cls("concurrency", concurrency=concurrency)

    @classmethod
    def trace(cls) -> Arrival:
        return cls("trace")

    @property
    def is_open_loop(self) -> bool:
        return self.kind != "concurrency"

    def describe(self) -> dict[str, Any]:
        """JSON-safe settings for `RunResult.config` (an infinite rate becomes "inf")."""
        rate = "inf" if self.rate is not None and math.isinf(self.rate) else self.rate
        return {
            "arrival": self.kind,
            "rate": rate,
            "burstiness": self.burstiness,
            "concurrency": self.concurrency,
        }


def arrival_times(arrival: Arrival, seed: int = 0) -> Iterator[float]:
    """Endless send offsets (seconds from the start) of a Poisson or gamma arrival.

    The first request goes at 0; gaps are i.i.d. Gamma(burstiness, 1/(rate*burstiness)),
    mean 1/rate (Poisson when burstiness is 1). Drawn in fixed-size batches from
    `numpy.random.default_rng(seed)`, so a seed gives the same times however many are read.
    """
    if arrival.kind not in ("poisson", "gamma"):
        raise ConfigError("arrival", f"{arrival.kind} has no generated arrival times")
    assert arrival.rate is not None  # checked in Arrival.__post_init__
    if math.isinf(arrival.rate):
        yield from itertools.repeat(0.0)
        return
    rng = np.random.default_rng(seed)
    scale = 1.0 / (arrival.rate * arrival.burstiness)
    t = 0.0
    while True:
        for gap in rng.gamma(arrival.burstiness, scale, size=256):
            yield t
            t += float(gap)


def base_url(url: str) -> str:
    """`http://host:port` from a URL that may end in `/` or `/v1`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def fetch_model_id(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The first model id of `GET /v1/models`."""
    request = urllib.request.Request(base_url(url) + "/v1/models", headers=_headers(api_key))
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        models = json.load(response).get("data") or []
    if not models:
        raise ConfigError("model", f"{url} lists no models; pass --model")
    return models[0]["id"]


async def run_benchmark(
    url: str,
    model: str,
    specs: Sequence[RequestSpec],
    arrival: Arrival,
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
    endpoint: str = "completions",
    extra_body: dict[str, Any] | None = None,
    api_key: str | None = None,
    seed: int = 0,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> RunResult:
    """Send `specs` (cycled if more requests are wanted) and measure every request.

    Stops after `num_requests` sends or once `duration_s` has passed (new sends stop;
    requests in flight finish), whichever comes first; trace arrivals also stop at the
    end of the trace. `extra_body` is merged into every request body; `config` entries
    (workload, SLO, price, ...) are recorded in `RunResult.config` with the run settings.
    """
    _check_run(specs, arrival, num_requests, duration_s, endpoint)
    import aiohttp  # here, not at the top: `pdserve --help` should not pay for it

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=request_timeout_s)
    # limit=0: open loop, no client-side queueing. force_close: a fresh connection per
    # request — some servers (llama-server) close kept-alive connections after a stream,
    # and a request sent on such a pooled socket fails before the server sees it.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, read_bufsize=2**20
    ) as session:
        client = _Client(session, url, model, endpoint, extra_body or {}, api_key)
        with _Progress(num_requests, arrival, specs, progress) as bar:
            client.on_done = bar.record_done
            if arrival.is_open_loop:
                times = _open_loop_times(arrival, specs, seed)
                records = await _run_open_loop(client, specs, times, num_requests, duration_s)
            else:
                assert arrival.concurrency is not None
                records = await _run_closed_loop(
                    client, specs, arrival.concurrency, num_requests, duration_s
                )
    settings = {
        "url": url,
        "model": model,
        "endpoint": endpoint,
        **arrival.describe(),
        "num_requests": num_requests,
        "duration_s": duration_s,
        "seed": seed,
        "extra_body": extra_body or {},
    }
    return RunResult(
        config={**settings, **(config or {})}, records=records, duration_s=_span(records)
    )


def run_benchmark_sync(*args: Any, **kwargs: Any) -> RunResult:
    """`run_benchmark` on a fresh event loop (same arguments)."""
    return asyncio.run(run_benchmark(*args, **kwargs))


def _check_run(
    specs: Sequence[RequestSpec],
    arrival: Arrival,
    num_requests: int | None,
    duration_s: float | None,
    endpoint: str,
) -> None:
    if endpoint not in ENDPOINTS:
        raise ConfigError("endpoint", f"{endpoint!r} is not one of {sorted(ENDPOINTS)}")
    if not specs:
        raise ConfigError("specs", "no requests to send")
    if num_requests is None and duration_s is None and arrival.kind != "trace":
        raise ConfigError("num_requests", "give a number of requests or a duration")
    if num_requests is None and arrival.rate is not None and math.isinf(arrival.rate):
        raise ConfigError("num_requests", "an infinite rate needs a number of requests")
    field_name = "prompt" if endpoint == "completions" else "messages"
    if any(getattr(spec, field_name) is None for spec in specs):
        other = "chat" if endpoint == "completions" else "completions"
        raise ConfigError(
            "endpoint", f"{endpoint} needs a {field_name} in every request; try {other}"
        )
    if arrival.kind == "trace" and any(spec.timestamp_s is None for spec in specs):
        raise ConfigError("arrival", "trace arrivals need a timestamp_s on every request")


def _open_loop_times(arrival: Arrival, specs: Sequence[RequestSpec], seed: int) -> Iterator[float]:
    if arrival.kind == "trace":
        return iter([spec.timestamp_s for spec in specs])  # type: ignore[misc]
    return arrival_times(arrival, seed)


async def _run_open_loop(
    client: _Client,
    specs: Sequence[RequestSpec],
    times: Iterator[float],
    num_requests: int | None,
    duration_s: float | None,
) -> list[RequestRecord]:
    tasks = []
    for index, offset in enumerate(times):
        if (num_requests is not None and index >= num_requests) or (
            duration_s is not None and offset >= duration_s
        ):
            break
        delay = client.start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(client.send(specs[index % len(specs)])))
    return list(await asyncio.gather(*tasks))


async def _run_closed_loop(
    client: _Client,
    specs: Sequence[RequestSpec],
    concurrency: int,
    num_requests: int | None,
    duration_s: float | None,
) -> list[RequestRecord]:
    indexes = itertools.count()
    done: dict[int, RequestRecord] = {}

    async def user() -> None:
        while True:
            index = next(indexes)
            if num_requests is not None and index >= num_requests:
                return
            if duration_s is not None and time.perf_counter() - client.start >= duration_s:
                return
            done[index] = await client.send(specs[index % len(specs)])

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return [done[i] for i in sorted(done)]


def _span(records: Sequence[RequestRecord]) -> float:
    """From the first send to the last completion (or failure)."""
    if not records:
        return 0.0
    first = min(r.start_s for r in records)
    return max(r.start_s + (r.e2e_s or 0.0) for r in records) - first


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class _Client:
    """One server endpoint on one session: sends a request and measures its stream."""

    def __init__(self, session, url, model, endpoint, extra_body, api_key) -> None:
        self.session = session
        self.url = base_url(url) + ENDPOINTS[endpoint]
        self.model = model
        self.is_chat = endpoint == "chat"
        self.extra_body = extra_body
        self.headers = _headers(api_key)
        self.start = time.perf_counter()
        self.on_done = lambda record: None
        self._session_tails: dict[str, asyncio.Future[None]] = {}  # each session's last turn

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": spec.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.is_chat:
            body["messages"] = spec.messages
        else:
            body["prompt"] = spec.prompt
        return {**body, **self.extra_body, **(spec.extra_body or {})}

    async def send(self, spec: RequestSpec) -> RequestRecord:
        """Measure one request; a session's turn first waits for the session's previous
        turn to finish (its prompt extends that turn's, as a real client's would)."""
        if spec.session_id is None:
            return await self._send(spec)
        previous = self._session_tails.get(spec.session_id)
        done = self._session_tails[spec.session_id] = asyncio.get_running_loop().create_future()
        try:
            if previous is not None:
                await previous
            return await self._send(spec)
        finally:
            done.set_result(None)

    async def _send(self, spec: RequestSpec) -> RequestRecord:
        sent = time.perf_counter()
        record = RequestRecord(start_s=sent - self.start, has_usage=False)
        try:
            async with self.session.post(
                self.url, json=self.body(spec), headers=self.headers
            ) as response:
                if response.status != 200:
                    record.error = (
                        f"HTTP {response.status}: {_error_message(await response.text())}"
                    )
                else:
                    await self._read_stream(response, record, sent)
        # NOTE: anything a server or the network does to one request is that request's
        # failure, recorded, never the run's: connection errors, timeouts, malformed data.
        except Exception as e:
            record.error = f"{type(e).__name__}: {e}".rstrip(": ")
        record.e2e_s = time.perf_counter() - sent
        if record.is_ok and record.ttft_s is None:
            record.error = "the stream ended without any text"
        self.on_done(record)
        return record

    async def _read_stream(self, response, record: RequestRecord, sent: float) -> None:
        last_token_at: float | None = None
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, SSE comments and other fields
            data = line[len(b"data:") :].strip()
            if data == b"[DONE]":
                return
            now = time.perf_counter()
            event = json.loads(data)
            if event.get("error"):
                record.error = f"error event: {_error_message(json.dumps(event))}"
                return
            if event.get("usage"):  # some servers send usage on every chunk: keep the last
                record.num_prompt_tokens = event["usage"].get("prompt_tokens") or 0
                record.num_output_tokens = event["usage"].get("completion_tokens") or 0
                record.has_usage = True
                details = event["usage"].get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    record.num_cached_tokens = details["cached_tokens"]
            if self._has_text(event):
                if last_token_at is None:
                    record.ttft_s = now - sent
                else:
                    record.itl_s.append(now - last_token_at)
                last_token_at = now

    def _has_text(self, event: dict[str, Any]) -> bool:
        choices = event.get("choices") or []
        if not choices:
            return False
        if not self.is_chat:
            return bool(choices[0].get("text"))
        delta = choices[0].get("delta") or {}
        return bool(delta.get("content") or delta.get("reasoning_content"))


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI error body, else the text itself (shortened)."""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or text)[:500]


class _Progress:
    """A tqdm bar of completed requests with live output tok/s (from usage, so counted
    as each request ends) and the number of errors."""

    def __init__(self, num_requests, arrival, specs, is_enabled: bool) -> None:
        from tqdm import tqdm

        total = num_requests
        if arrival.kind == "trace":
            total = min(num_requests or len(specs), len(specs))
        self.bar = tqdm(total=total, unit="req", disable=not is_enabled, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.num_output_tokens = self.num_errors = 0

    def record_done(self, record: RequestRecord) -> None:
        self.num_output_tokens += record.num_output_tokens
        self.num_errors += not record.is_ok
        rate = self.num_output_tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} out tok/s, {self.num_errors} errors", refresh=False)
        self.bar.update(1)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()
