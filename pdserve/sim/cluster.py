"""The discrete-event simulation of one `pdserve serve` deployment: router + workers.

What runs is pdserve's own decision code: per worker the real `Scheduler` and
`BlockManager` (sim/worker.py); in the router the real `plan_request` and routing policy
(router/policy.py, router/selection.py) over `SimHandle`s, the real prefix index
(router/kv_index.py) fed by the workers' real KV events, and the request validation the
router applies (engine/limits.py). The message flow is `router/cluster.py`'s and
`worker/handoff.py`'s:

- local (aggregated, or auto keeping a prompt on the decode worker): `AddRequest`;
- remote: `ReserveKV` to the decode worker, which admits it when its pool has room (at a
  loop pass, i.e. between its steps) → `KVReserved` → `PrefillRequest` to the prefill
  worker → its first token goes to the router at once, and `KVDone` reaches the decode
  worker after the hand-over → it decodes from that token.

Time: every message takes `profile.ipc_latency_s`; a worker handles messages only between
steps (as its loop does) and at once when idle. When the scheduler foresees that its next
steps are the same decode batch (`Scheduler.decode_run_length`) they are one event, a
run (sim/steps.py), applied by `Scheduler.advance_decodes` and cut short by any message:
the same clock as stepping one by one, except that the router's prefix index and pool
stats learn a run's KV events and free blocks at its end, not after each of its steps. A step lasts `StepCost.step_seconds` of
its batch, stretched while workers share the machine's cores: with `d` threads stepping
on `c` cores each runs at `min(1, c/d)` speed, and also `contention` times slower when
another worker steps beside it (memory bandwidth; measured by `pdserve profile`)
— processor sharing, so a step's end moves whenever another worker starts or stops.
Other programs on a shared host count as `background_load` threads always running.
KV hand-over: `shm` copies inside the prefill worker's step (`TransferCost.on_sender`);
other backends overlap the prefill layer by layer and add what is left after its step.

Not modelled: the router's own CPU time (tokenising, detokenising, SSE), the worker
loop's bookkeeping outside `ModelRunner.execute`, stop strings and EOS (outputs run to
`max_tokens`), timeouts and failures.

Deterministic: no wall clock and no randomness beyond the workload's seeded sampling.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.bench.types import RequestRecord
from pdserve.engine.limits import check_request
from pdserve.errors import InvalidRequestError
from pdserve.router.kv_index import KVIndex, prompt_hashes
from pdserve.router.ledger import Charges, LoadLedger
from pdserve.router.policy import plan_request
from pdserve.serve import ServeConfig
from pdserve.sim.cost_model import StepCost
from pdserve.sim.handles import SimHandle, SimPool, SimStats
from pdserve.sim.profile import Profile
from pdserve.sim.steps import Busy
from pdserve.sim.worker import (
    DecodeRun,
    Output,
    Reserved,
    SimWorker,
    make_request,
    num_kv_blocks,
)


@dataclass(eq=False)
class _Flight:
    """One request from the router's side (`router/cluster.py`'s `_Child`)."""

    index: int
    request_id: str
    token_ids: list[int]
    max_tokens: int
    record: RequestRecord
    charges: Charges  # the router's load ledger (router/ledger.py), as in ClusterClient
    prefill: SimHandle | None = None
    decode: SimHandle | None = None
    num_cached_on_prefill: int = 0
    num_kv_bytes: int = 0  # KV sent to the decode worker (remote prefill)
    num_tokens: int = 0
    last_token_s: float = 0.0
    is_user: bool = False  # closed loop: its user sends the next request when it ends
    block_hashes: list | None = None  # the prompt's, as the router hashed it


class ClusterSim:
    def __init__(
        self,
        serve: ServeConfig,
        profile: Profile,
        max_blocks: int | None = None,
        role_costs: dict[str, StepCost] | None = None,
        background_load: float = 0.0,
        decode_runs: bool = True,
    ) -> None:
        """`max_blocks`: cap each KV pool (the planner's shortcut: a pool larger than its
        requests can ever fill only costs set-up time, but it also keeps more prefixes
        cached, so the cap should be generous). `role_costs`: a cost per role instead of
        the profile's (the planner times one phase alone by making the other free).
        `background_load`: threads of other programs running on the machine all along
        (a shared host), which take their share of the cores."""
        self.serve = serve
        self.decode_runs = decode_runs
        self.max_blocks = max_blocks
        self.role_costs = role_costs or {}
        self.profile = profile
        self.routing = serve.routing()
        self.selector = self.routing.selector()
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.pool = SimPool()
        self.ledger = LoadLedger(self.pool)
        self.workers: dict[str, SimWorker] = {}
        self.kv_index = KVIndex()
        self.threads = serve.threads_per_worker or max(
            1, profile.cores // max(1, sum(serve.worker_counts().values()))
        )
        self.max_model_len = serve.engine.max_model_len or profile.model["max_position_embeddings"]
        for role, count in serve.worker_counts().items():
            for i in range(count):
                self._add_worker(f"{role}-{i}", role)
        self.transfer = profile.transfer_cost(self._backend())
        self.shares_cores = profile.hardware.get("device") == "cpu"
        self.background_load = background_load
        self._steps: dict[str, Busy] = {}
        self._inbox: dict[str, deque] = {w: deque() for w in self.workers}
        self._flights: dict[str, _Flight] = {}
        self.on_done: Callable[[_Flight], None] = lambda flight: None

    def _add_worker(self, worker_id: str, role: str) -> None:
        engine = self.serve.engine
        num_blocks = num_kv_blocks(self.profile, engine, self.threads)
        if self.max_blocks is not None:
            num_blocks = min(num_blocks, self.max_blocks)
        cost = self.role_costs.get(role) or self.profile.cost(self.threads)
        worker = SimWorker(
            worker_id,
            role,
            engine,
            cost,
            num_blocks,
            self.max_model_len,
            self.threads,
            self.decode_runs,
        )
        self.workers[worker_id] = worker
        self.pool.add(
            SimHandle(worker_id, role, engine.block_size, SimStats(num_blocks, num_blocks))
        )
        self.kv_index.apply(worker.kv_events.snapshot())

    def _backend(self) -> str:
        backend = self.routing.kv_backend
        if backend != "auto":
            return backend
        return "shm" if self.profile.hardware.get("device") == "cpu" else "nixl"

    # ---- the event loop ------------------------------------------------------------------

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self) -> None:
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(*args)

    def _to_worker(self, worker_id: str, fn: Callable, *args) -> None:
        self.at(self.now + self.profile.ipc_latency_s, self._deliver, worker_id, fn, args)

    def _to_router(self, fn: Callable, *args, delay: float | None = None) -> None:
        self.at(self.now + (self.profile.ipc_latency_s if delay is None else delay), fn, *args)

    def _deliver(self, worker_id: str, fn: Callable, args: tuple) -> None:
        busy = self._steps.get(worker_id)
        if busy is not None:
            self._inbox[worker_id].append((fn, args))  # handled after the current step
            if busy.cut(self.now):
                self.at(busy.end_time(), self._end_step, worker_id, busy, busy.version)
            return
        fn(*args)
        self._loop_pass(self.workers[worker_id])

    # ---- workers -------------------------------------------------------------------------

    def _loop_pass(self, worker: SimWorker) -> None:
        """The rest of a worker loop pass: admit reservations, step if there is work."""
        for reserved in worker.admit():
            self._reply_reserved(reserved)
        self._publish(worker)
        if worker.worker_id in self._steps or not worker.has_work():
            return
        started = worker.start_step()
        if started is None:
            return
        work, works = started
        if not isinstance(work, DecodeRun):
            works[0] += self._copy_seconds(work)
        self._steps[worker.worker_id] = Busy(worker, work, works, self.now)
        self._reschedule(worker.worker_id)

    def _copy_seconds(self, output) -> float:
        """shm hand-over: the prefill worker writes the KV it computes into the decode pool."""
        if not self.transfer.on_sender:
            return 0.0
        tokens = sum(s.num_new_tokens for s in output.scheduled if s.request.kv_dest is not None)
        return tokens * self.profile.kv_bytes_per_token / self.transfer.bytes_per_s

    def _end_step(self, worker_id: str, busy: Busy, version: int) -> None:
        if self._steps.get(worker_id) is not busy or busy.version != version:
            return  # rescheduled since
        del self._steps[worker_id]
        worker = busy.worker
        step_s = self.now - busy.started
        worker.busy_s += step_s
        if isinstance(busy.work, DecodeRun):
            request_ids, finished = worker.finish_run(len(busy.works))
            ends = busy.step_ends(self.now)
            self._to_router(self._on_run_outputs, worker_id, request_ids, ends, finished)
        else:
            outputs = worker.finish_step(busy.work)
            if worker.role == "prefill":
                for out in outputs:
                    self._on_worker_output(worker, out, step_s)
            if outputs:  # one `StepOutputs` message per step
                self._to_router(self._on_step_outputs, worker_id, outputs)
        self._reschedule(None)
        inbox = self._inbox[worker_id]
        while inbox:
            fn, args = inbox.popleft()
            fn(*args)
        self._loop_pass(worker)

    def _publish(self, worker: SimWorker) -> None:
        message = worker.kv_events.poll()
        if message is not None:
            self.kv_index.apply(message)
        stats = self.pool.workers[worker.worker_id].stats
        stats.num_free_blocks = worker.free_blocks()

    def _reschedule(self, started: str | None) -> None:
        """Processor sharing: every stepping worker's speed given who else steps. Work
        whose speed is unchanged keeps its end event."""
        steps = self._steps
        if not self.shares_cores:  # own devices: only the new step needs its end event
            if started is not None:
                busy = steps[started]
                busy.set_speed(self.now, 1.0)
                self.at(busy.end_time(), self._end_step, started, busy, busy.version)
            return
        demand = sum(b.worker.threads for b in steps.values()) + self.background_load
        cores = self.profile.cores
        for worker_id, busy in steps.items():
            speed = self._speed(busy.worker.threads, demand, cores)
            if worker_id != started and speed == busy.speed:
                continue
            busy.set_speed(self.now, speed)
            self.at(busy.end_time(), self._end_step, worker_id, busy, busy.version)

    def _speed(self, threads: int, demand: float, cores: int) -> float:
        if not self.shares_cores:
            return 1.0
        others = demand - threads
        overlap = 1.0
        if others > 0:
            overlap += (self.profile.contention - 1.0) * min(1.0, others / max(1, cores - threads))
        return min(1.0, cores / demand) / overlap

    # ---- the router ----------------------------------------------------------------------

    def dispatch(self, index: int, token_ids: list[int], max_tokens: int) -> _Flight:
        """A request reaching the router now (`ClusterClient._dispatch`)."""
        record = RequestRecord(start_s=self.now, num_prompt_tokens=len(token_ids))
        charges = Charges(len(token_ids))
        flight = _Flight(index, f"req-{index}", token_ids, max_tokens, record, charges)
        error = self._validate(flight)
        if error is None:
            error = self._plan(flight)
        if error is not None:
            record.error, record.e2e_s, record.has_usage = error, 0.0, False
            self.on_done(flight)
        return flight

    def _validate(self, flight: _Flight) -> str | None:
        pools = [w for w in self.workers.values() if w.role != "prefill"]
        smallest = min(pools, key=lambda w: w.block_manager.num_blocks) if pools else None
        try:
            check_request(
                flight.token_ids,
                make_request(flight.request_id, [], flight.max_tokens, 0).sampling_params,
                max_model_len=self.max_model_len,
                vocab_size=self.profile.model["vocab_size"],
                block_size=smallest.block_size if smallest else None,
                num_blocks=smallest.block_manager.num_blocks if smallest else None,
            )
        except InvalidRequestError as e:
            return f"HTTP 400: {e}"
        return None

    def _plan(self, flight: _Flight) -> str | None:
        size = self.serve.engine.block_size
        hashes = flight.block_hashes = prompt_hashes(flight.token_ids, size)
        alive = [w.worker_id for w in self.pool.workers.values() if w.is_alive]
        matches = self.kv_index.match(hashes, alive)

        def cached(worker: SimHandle) -> int:
            return matches[worker.worker_id].num_blocks * worker.block_size

        num_prompt = len(flight.token_ids)
        plan = plan_request(self.pool, self.routing, num_prompt, cached, self.selector)
        if plan is None:
            return f"HTTP 503: no live worker for mode {self.routing.mode!r}"
        flight.decode = plan.decode
        self._flights[flight.request_id] = flight
        request = make_request(
            flight.request_id, flight.token_ids, flight.max_tokens, self.now, flight.block_hashes
        )
        worker = self.workers[plan.decode.worker_id]
        if plan.prefill is None:
            self.ledger.charge(flight.charges, plan.decode, num_prompt + flight.max_tokens)
            self.ledger.charge_prefill(flight.charges, plan.decode, cached(plan.decode))
            self._to_worker(worker.worker_id, worker.on_add, request)
            return None
        flight.prefill = plan.prefill
        flight.num_cached_on_prefill = cached(plan.prefill)
        self.ledger.charge(flight.charges, plan.decode, flight.max_tokens)
        self._to_worker(worker.worker_id, self._reserve, worker, request)
        return None

    def _reserve(self, worker: SimWorker, request) -> None:
        for reserved in worker.on_reserve(request):
            self._reply_reserved(reserved)

    def _reply_reserved(self, reserved: Reserved) -> None:
        self._to_router(self._on_reserved, reserved)

    def _on_reserved(self, reserved: Reserved) -> None:
        flight = self._flights[reserved.request_id]
        prefill = flight.prefill
        self.ledger.charge(flight.charges, prefill, len(flight.token_ids))
        self.ledger.charge_prefill(flight.charges, prefill, flight.num_cached_on_prefill)
        num_sent = reserved.num_blocks - reserved.num_cached_blocks
        flight.num_kv_bytes = (
            num_sent * self.serve.engine.block_size * self.profile.kv_bytes_per_token
        )
        request = make_request(
            flight.request_id, flight.token_ids, flight.max_tokens, self.now, flight.block_hashes
        )
        worker = self.workers[prefill.worker_id]
        self._to_worker(worker.worker_id, worker.on_add, request, flight)

    def _on_worker_output(self, worker: SimWorker, out: Output, step_s: float) -> None:
        flight = self._flights[out.request_id]
        if flight.prefill is not None and worker.worker_id == flight.prefill.worker_id:
            self._send_kv_done(flight, out, step_s)

    def _send_kv_done(self, flight: _Flight, out: Output, step_s: float) -> None:
        """`KVDone` with the first token, at the decode worker once the KV is there."""
        decode = self.workers[flight.decode.worker_id]
        delay = self.profile.ipc_latency_s + self._transfer_tail(flight, step_s)
        args = (flight.request_id, out.token_id, out.is_finished)
        self.at(self.now + delay, self._deliver, decode.worker_id, decode.on_kv_done, args)

    def _transfer_tail(self, flight: _Flight, step_s: float) -> float:
        """Hand-over time left after the prefill step (layer-wise streaming overlaps)."""
        if self.transfer.on_sender:
            return 0.0
        total = self.transfer.seconds(flight.num_kv_bytes)
        if not self.serve.kv_layerwise:
            return total
        return max(total / self.profile.model["num_layers"], total - step_s)

    def _on_step_outputs(self, worker_id: str, outputs: list[Output]) -> None:
        flights, now = self._flights, self.now
        for out in outputs:
            flight = flights[out.request_id]
            if flight.num_tokens and not out.is_finished:  # a decode token: only the clock
                flight.record.itl_s.append(now - flight.last_token_s)
                flight.num_tokens += 1
                flight.last_token_s = now
            else:
                self._on_token(flight, worker_id, out)

    def _on_run_outputs(
        self, worker_id: str, request_ids: list[str], ends: list[float], finished: list[Output]
    ) -> None:
        """A run's tokens, each at the time its step's `StepOutputs` would have arrived:
        only the clock, but for the requests that stop at its last step."""
        ipc = self.profile.ipc_latency_s
        arrivals = [t + ipc for t in ends]
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        stopping = {out.request_id for out in finished}
        num_steps = len(arrivals)
        for request_id in request_ids:
            flight = self._flights[request_id]
            plain = num_steps - 1 if request_id in stopping else num_steps
            if plain:
                itl = flight.record.itl_s
                itl.append(arrivals[0] - flight.last_token_s)
                itl.extend(gaps[: plain - 1])
                flight.num_tokens += plain
                flight.last_token_s = arrivals[plain - 1]
        for out in finished:
            self._on_token(self._flights[out.request_id], worker_id, out)

    def _on_token(self, flight: _Flight, worker_id: str, out: Output) -> None:
        """`ClusterClient._on_outputs` for one output, and the client's clock."""
        self.ledger.prefill_done(flight.charges)
        is_from_prefill = flight.prefill is not None and worker_id == flight.prefill.worker_id
        if out.is_finished or is_from_prefill:
            self.ledger.release(flight.charges, worker_id)
        record = flight.record
        if flight.num_tokens == 0:
            record.ttft_s = self.now - record.start_s
            record.num_cached_tokens = out.num_cached_tokens
        else:
            record.itl_s.append(self.now - flight.last_token_s)
        flight.num_tokens += 1
        flight.last_token_s = self.now
        if out.is_finished:
            self.ledger.release_all(flight.charges)
            del self._flights[flight.request_id]
            record.num_output_tokens = flight.num_tokens
            record.e2e_s = self.now - record.start_s
            self.on_done(flight)
