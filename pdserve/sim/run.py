"""Driving a simulated deployment with `pdserve bench`'s load: `simulate(...) -> RunResult`.

The same inputs as `pdserve bench run` — `RequestSpec`s from a workload or a trace, an
`Arrival` (Poisson or gamma at a rate, all at once, a trace's timestamps, or a closed loop
of `concurrency` users), a number of requests or a duration, a seed — and the same output,
a `RunResult` whose records hold what a client would have measured (TTFT from sending to
the first token reaching the router; one inter-token gap per later token; E2E to the
last). So `bench/metrics.py` summarises it, `bench/report.py` plots it and `pdserve bench
compare` sets it beside a real run.

As in the load generator (`bench/loadgen.py`), specs are cycled when more requests are
wanted, and a turn of a session is sent no earlier than the end of the session's previous
turn. Client-side network time is not modelled (the router is on the same host).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from pdserve.bench.loadgen import Arrival, arrival_times
from pdserve.bench.types import RequestRecord, RequestSpec, RunResult
from pdserve.errors import ConfigError
from pdserve.serve_config import ServeConfig
from pdserve.sim.cluster import ClusterSim
from pdserve.sim.host_trace import HostSlowdown
from pdserve.sim.profile import Profile
from pdserve.sim.tokens import PromptEncoder


class _Load:
    """Sends requests into a `ClusterSim` the way the load generator would."""

    def __init__(
        self,
        sim: ClusterSim,
        specs: Sequence[RequestSpec],
        encoder: PromptEncoder,
        num_requests: int | None,
        duration_s: float | None,
    ) -> None:
        self.sim = sim
        self.specs = specs
        self.encoder = encoder
        self.num_requests = num_requests
        self.duration_s = duration_s
        self.records: dict[int, RequestRecord] = {}
        self._ids: dict[int, list[int]] = {}  # token ids per spec index
        self._session_busy: set[str] = set()
        self._session_queue: dict[str, deque[int]] = {}
        self._next_index = 0
        sim.on_done = self._done

    def _may_send(self, index: int, offset: float) -> bool:
        if self.num_requests is not None and index >= self.num_requests:
            return False
        return self.duration_s is None or offset < self.duration_s

    def open_loop(self, times: Iterator[float]) -> None:
        for index, offset in enumerate(times):
            if not self._may_send(index, offset):
                break
            self.sim.at(offset, self._arrive, index)

    def closed_loop(self, concurrency: int) -> None:
        for _ in range(concurrency):
            self.sim.at(0.0, self._next_user_request)

    def _next_user_request(self) -> None:
        index = self._next_index
        if not self._may_send(index, self.sim.now):
            return
        self._next_index += 1
        self._send(index, user=True)

    def _arrive(self, index: int) -> None:
        session = self.specs[index % len(self.specs)].session_id
        if session is not None and session in self._session_busy:
            self._session_queue.setdefault(session, deque()).append(index)
            return
        self._send(index)

    def _send(self, index: int, user: bool = False) -> None:
        spec = self.specs[index % len(self.specs)]
        if spec.session_id is not None:
            self._session_busy.add(spec.session_id)
        token_ids = self._token_ids(index % len(self.specs))
        flight = self.sim.dispatch(index, token_ids, spec.max_tokens)
        flight.is_user = user
        self.records[index] = flight.record

    def _token_ids(self, spec_index: int) -> list[int]:
        ids = self._ids.get(spec_index)
        if ids is None:
            ids = self._ids[spec_index] = self.encoder.encode(self.specs[spec_index])
        return ids

    def _done(self, flight) -> None:
        flight.record.has_usage = flight.record.is_ok
        spec = self.specs[flight.index % len(self.specs)]
        session = spec.session_id
        if session is not None:
            self._session_busy.discard(session)
            queue = self._session_queue.get(session)
            if queue:
                self._send(queue.popleft())
        if flight.is_user:
            self.sim.at(self.sim.now, self._next_user_request)


def simulate(
    serve: ServeConfig,
    profile: Profile,
    specs: Sequence[RequestSpec],
    arrival: Arrival,
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    encoder: PromptEncoder | None = None,
    config: dict[str, Any] | None = None,
    max_blocks: int | None = None,
    role_costs: dict | None = None,
    background_load: float = 0.0,
    decode_runs: bool = True,
    busy_workers: int = 0,
    host_slowdown: HostSlowdown | None = None,
    background_trace: Sequence[tuple[float, float]] = (),
) -> RunResult:
    """Run `specs` through a simulated `serve` deployment; what a client would measure.
    `decode_runs=False` simulates every step on its own (slower; the same clock).
    `host_slowdown`: replay a real run's measured host slowdown (sim/host_trace.py);
    `background_trace`: (time, threads) of other programs' load sampled during one."""
    if not specs:
        raise ConfigError("specs", "no requests to send")
    if num_requests is None and duration_s is None and arrival.kind != "trace":
        raise ConfigError("num_requests", "give a number of requests or a duration")
    sim = ClusterSim(
        serve,
        profile,
        max_blocks,
        role_costs,
        background_load,
        decode_runs,
        busy_workers,
        host_slowdown,
        background_trace,
    )
    load = _Load(sim, specs, encoder or PromptEncoder(), num_requests, duration_s)
    if arrival.kind == "concurrency":
        load.closed_loop(arrival.concurrency or 1)
    elif arrival.kind == "trace":
        load.open_loop(iter([s.timestamp_s or 0.0 for s in specs]))
    else:
        load.open_loop(arrival_times(arrival, seed))
    sim.run()
    records = [load.records[i] for i in sorted(load.records)]
    settings = {
        "url": "sim",
        "model": profile.model.get("name"),
        "endpoint": "chat" if all(s.prompt is None for s in specs) else "completions",
        **arrival.describe(),
        "num_requests": num_requests,
        "duration_s": duration_s,
        "seed": seed,
        "extra_body": {"ignore_eos": True},
        "simulated": True,
    }
    return RunResult({**settings, **(config or {})}, records, _span(records))


def _span(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    first = min(r.start_s for r in records)
    return max(r.start_s + (r.e2e_s or 0.0) for r in records) - first
