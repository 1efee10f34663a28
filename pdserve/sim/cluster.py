"""The discrete-event simulation of one `pdserve serve` deployment: router + workers.

What runs is pdserve's own decision code: per worker the real `Scheduler` and
`BlockManager` (sim/worker.py); in the router (sim/router_side.py) the real
`plan_request` and routing policy over `SimHandle`s, the real prefix index
(router/kv_index.py) fed by the workers' real KV events, the load ledger and the request
validation the router applies. The message flow is `router/cluster.py`'s and
`worker/handoff.py`'s:

- local (aggregated, or auto keeping a prompt on the decode worker): `AddRequest`;
- remote: `ReserveKV` to the decode worker, which admits it when its pool has room (at a
  loop pass, i.e. between its steps) → `KVReserved` → `PrefillRequest` to the prefill
  worker → its first token goes to the router at once, and `KVDone` reaches the decode
  worker after the hand-over → it decodes from that token.

Time: every message takes `profile.ipc_latency_s`; a worker handles messages only between
steps (as its loop does) and at once when idle. A step lasts `StepCost.step_seconds` of
its batch at full speed; on a CPU its speed changes as workers and the front end start
and stop using the shared cores and memory bandwidth (sim/sharing.py), so its end moves.
When the scheduler foresees that its next steps are the same decode batch
(`Scheduler.decode_run_length`) they are one event, a run (sim/steps.py), applied by
`Scheduler.advance_decodes` and cut short by any message: the same clock as stepping one
by one, except that the router's prefix index and pool stats learn a run's KV events and
free blocks at its end, not after each of its steps. KV hand-over: `shm` copies inside
the prefill worker's step (`TransferCost.on_sender`); other backends overlap the prefill
layer by layer and add what is left after its step.

The worker loop's bookkeeping outside `ModelRunner.execute` is the cost model's
`step_overhead_s` (measured from a real run's step log, sim/step_log_fit.py; 0 in a
profile that has none). Not modelled: stop strings and EOS (outputs run to
`max_tokens`), timeouts and failures; the front end's CPU slows the workers but does not
delay the tokens it streams.

Deterministic: no wall clock and no randomness beyond the workload's seeded sampling.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence

from pdserve.router.kv_index import KVIndex
from pdserve.router.ledger import LoadLedger
from pdserve.serve_config import ServeConfig
from pdserve.sim.cost_model import StepCost
from pdserve.sim.handles import SimHandle, SimPool, SimStats
from pdserve.sim.host_trace import HostSlowdown
from pdserve.sim.profile import Profile
from pdserve.sim.router_side import Flight, SimRouter
from pdserve.sim.sharing import FrontEnd, speeds
from pdserve.sim.steps import Busy
from pdserve.sim.worker import DecodeRun, SimWorker, num_kv_blocks


class ClusterSim(SimRouter):
    def __init__(
        self,
        serve: ServeConfig,
        profile: Profile,
        max_blocks: int | None = None,
        role_costs: dict[str, StepCost] | None = None,
        background_load: float = 0.0,
        decode_runs: bool = True,
        busy_workers: int = 0,
        host_slowdown: HostSlowdown | None = None,
        background_trace: Sequence[tuple[float, float]] = (),
    ) -> None:
        """`max_blocks`: cap each KV pool (the planner's shortcut: a pool larger than its
        requests can ever fill only costs set-up time, but it also keeps more prefixes
        cached, so the cap should be generous). `role_costs`: a cost per role instead of
        the profile's (the planner times one phase alone by making the other free).
        `background_load`: threads of other programs running on the machine all along
        (a shared host), which take their share of the cores. `busy_workers`: workers
        outside the simulation stepping all along (sim/sharing.py). `host_slowdown`: a real
        run's measured slowdown over time, replayed on every worker (sim/host_trace.py).
        `background_trace`: (time, threads) samples of other programs' load during a real
        run, replayed as a `background_load` that changes at each sample's time."""
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
        self.busy_workers = busy_workers
        self._steps: dict[str, Busy] = {}
        self._host_factor = 1.0
        if host_slowdown is not None:
            for t, factor in zip(host_slowdown.times, host_slowdown.factors, strict=True):
                self.at(t, self._set_host_factor, factor)
        for t, threads in background_trace:
            self.at(t, self._set_background, threads)
        self._inbox: dict[str, deque] = {w: deque() for w in self.workers}
        self._flights: dict[str, Flight] = {}
        self.frontend = FrontEnd()
        self.on_done: Callable[[Flight], None] = lambda flight: None

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
            (self.profile.receive_s_per_request, self.profile.receive_s_per_block),
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
        if isinstance(work, DecodeRun):
            tokens = len(worker.scheduler.running)
        else:
            works[0] += self._copy_seconds(work)
            tokens = sum(s.num_new_tokens for s in work.scheduled)
        works[0] += worker.take_receive_seconds()
        self._steps[worker.worker_id] = Busy(worker, work, works, self.now, tokens)
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
        if busy.worker is self.frontend:
            self._reschedule(None)
            return
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
        """Every work in progress's speed now (sim/sharing.py). Work whose speed is
        unchanged keeps its end event."""
        steps = self._steps
        host = 1.0 / self._host_factor
        if not self.shares_cores:  # own devices: only the new step needs its end event
            if started is not None:
                busy = steps[started]
                busy.set_speed(self.now, host)
                self.at(busy.end_time(), self._end_step, started, busy, busy.version)
            return
        profile = self.profile
        new = speeds(
            steps,
            profile.cores,
            self.background_load,
            profile.contention,
            compute_contention=profile.compute_contention,
            busy_workers=self.busy_workers,
            curve=profile.contention_curve,
        )
        for key, busy in steps.items():
            speed = new[key] if busy.worker is self.frontend else new[key] * host
            if key != started and speed == busy.speed:
                continue
            busy.set_speed(self.now, speed)
            self.at(busy.end_time(), self._end_step, key, busy, busy.version)

    def _set_background(self, threads: float) -> None:
        self.background_load = threads
        self._reschedule(None)

    def _set_host_factor(self, factor: float) -> None:
        """The replayed host slowdown changes (sim/host_trace.py): every step's speed too."""
        self._host_factor = factor
        if self.shares_cores:
            self._reschedule(None)
            return
        for key, busy in self._steps.items():
            busy.set_speed(self.now, 1.0 / factor)
            self.at(busy.end_time(), self._end_step, key, busy, busy.version)

    def _frontend_work(self, seconds: float) -> None:
        """CPU the router and the client spend now (a request, streamed tokens)."""
        if seconds <= 0.0 or not self.shares_cores:
            return
        busy = self._steps.get(FrontEnd.worker_id)
        if busy is None:
            self._steps[FrontEnd.worker_id] = Busy(self.frontend, None, [seconds], self.now)
            self._reschedule(FrontEnd.worker_id)
            return
        busy.add_work(self.now, seconds)
        self.at(busy.end_time(), self._end_step, FrontEnd.worker_id, busy, busy.version)
