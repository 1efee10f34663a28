"""`ClusterClient`: the `EngineClient` that drives worker processes over ZeroMQ.

It tokenises nothing (the HTTP layer does) and detokenises everything: workers exchange
token ids only, and one `OutputProcessor` here turns them into text, stop strings and
stream deltas.

This module is the hub: lifecycle (the socket workers report to, the receive and liveness
loops), the `EngineClient` API (`generate`, `abort`, readiness) and the operations the
admin API calls. The work is done by the parts it wires together:
- router/samples.py: each request's samples and the one `Attempt` at a time that runs
  each (router/dispatch.py: local, or prefill on P and decode on D with KV hand-over),
  charged to the load ledger (router/ledger.py), and migrating a sample whose attempt was
  lost: a new attempt resumes it from the tokens already streamed;
- router/inbound.py: what workers say about requests (outputs, in token order, to the
  request's queue, which `generate` yields from; reservations; failures);
- router/liveness.py: what workers say about themselves, lease expiry and fencing
  (control/membership.py), and what losing a worker does to the samples on it;
- router/drain.py and router/elastic.py: draining, role switches, scale in/out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from pdserve.config import ModelConfig
from pdserve.control.launcher import Launcher
from pdserve.control.membership import DEFAULT_LEASE_S, Membership
from pdserve.control.migration import MigrationConfig
from pdserve.control.workers import WorkerHandle, WorkerPool
from pdserve.engine.limits import check_request
from pdserve.engine.output_processor import OutputProcessor
from pdserve.errors import InvalidRequestError
from pdserve.ipc import messages as m
from pdserve.ipc import security
from pdserve.ipc.security import ClusterKey
from pdserve.outputs import StreamUpdate
from pdserve.router.client import EngineClient, Readiness, WorkerStatus
from pdserve.router.dispatch import Attempt, Dispatcher
from pdserve.router.drain import DrainReport, Drains
from pdserve.router.elastic import Elastic
from pdserve.router.inbound import Inbound
from pdserve.router.kv_index import KVIndex
from pdserve.router.ledger import LoadLedger
from pdserve.router.liveness import Liveness
from pdserve.router.policy import RoutingConfig, required_jobs
from pdserve.router.samples import Sample, Samples, Stream
from pdserve.router.stream_queue import UpdateQueue
from pdserve.sampling_params import SamplingParams, child_params
from pdserve.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pdserve.control.planner import RequestLog
    from pdserve.control.planner_loop import PlannerLoop

logger = logging.getLogger(__name__)


class ClusterClient(EngineClient):
    def __init__(
        self,
        model_dir: Path,
        router_addr: str,
        routing: RoutingConfig | None = None,
        model_name: str | None = None,
        max_model_len: int | None = None,
        min_workers: int = 1,
        metrics=None,
        lease_s: float = DEFAULT_LEASE_S,
        migration: MigrationConfig | None = None,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_config = ModelConfig.from_pretrained(model_dir)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        self.model_name = model_name or self.model_dir.name
        self._max_model_len = max_model_len or self.model_config.max_position_embeddings
        self.routing = routing or RoutingConfig()
        self.migration = migration or MigrationConfig()
        self.router_addr = router_addr
        self.min_workers = min_workers
        self.metrics = metrics
        self.ctx = zmq.asyncio.Context()
        self.cluster_key = cluster_key  # None: CURVE off (ipc/security.py)
        self._auth = None
        self.pool = WorkerPool(self.ctx)
        self.membership = Membership(self.pool, lease_s)
        self.ledger = LoadLedger(self.pool)
        self.kv_index = KVIndex()
        self.dispatcher = Dispatcher(
            self.pool, self.ledger, self.kv_index, lambda: self.routing, lambda: self.metrics
        )
        self.drains = Drains(self)
        self.elastic = Elastic(self)
        self.launcher: Launcher | None = None  # set by `pdserve serve`: scale in/out
        self.request_log: RequestLog | None = None  # the SLO planner's; serving.py records
        self.planner: PlannerLoop | None = None
        self.processor = OutputProcessor(self.tokenizer)
        self.samples = Samples(
            self.pool,
            self.ledger,
            self.dispatcher,
            self.processor,
            self.migration,
            lambda: self.routing,
            lambda: self.metrics,
        )
        self.inbound = Inbound(
            self.pool, self.ledger, self.processor, self.samples, lambda: self.metrics
        )
        self.liveness = Liveness(
            self.model_config,
            self.pool,
            self.membership,
            self.kv_index,
            self.samples,
            lambda: self.on_worker_expired,
        )
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self.num_kv_transfers = 0  # completed hand-offs, and their bytes
        self.num_kv_transfer_bytes = 0
        # Called with a worker id when its lease runs out: the launcher kills the process,
        # so a fenced worker cannot keep writing KV (control/launcher.py).
        self.on_worker_expired: Callable[[str], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket workers report to and start listening (inside the event loop)."""
        self._auth = security.secure_context(self.ctx, self.cluster_key)
        self._socket = security.as_server(self.ctx.socket(zmq.PULL), self.cluster_key)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.router_addr)
        self.router_addr = self._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._tasks = [
            asyncio.create_task(self._receive_loop()),
            asyncio.create_task(self.liveness.run()),
        ]

    async def stop(self, shutdown_workers: bool | Iterable[str] = True) -> None:
        """Stop listening. `shutdown_workers`: True for all registered workers, or the ids
        of the ones to stop (those this process launched)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if shutdown_workers:
            wanted = None if shutdown_workers is True else set(shutdown_workers)
            for handle in self.pool.workers.values():
                if wanted is None or handle.worker_id in wanted:
                    handle.send(m.Shutdown())
            await asyncio.sleep(0.05)  # let the shutdowns leave
        self.pool.close()
        if self._socket is not None:
            self._socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

    async def wait_until_ready(self, timeout_s: float) -> Readiness:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            readiness = self.readiness()
            if readiness.is_ready:
                return readiness
            await asyncio.sleep(0.05)
        return self.readiness()

    # ---- EngineClient ----------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        limits = [w.info.max_model_len for w in self.pool.workers.values()]
        return min([self._max_model_len, *limits])

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own check, against the smallest decode-capable pool registered."""
        pools = [w.info.kv_layout for w in self.pool.workers.values() if w.role != "prefill"]
        smallest = min(pools, key=lambda p: p.num_blocks) if pools else None
        check_request(
            prompt_token_ids,
            params,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            block_size=smallest.block_size if smallest else None,
            num_blocks=smallest.num_blocks if smallest else None,
        )

    def queued_prefill_tokens(self) -> int:
        """Per live worker, the larger of what the router assigned and what it reports."""
        return sum(
            max(w.pending_prefill_tokens, w.num_waiting_prefill_tokens)
            for w in self.pool.workers.values()
            if w.is_alive
        )

    def readiness(self) -> Readiness:
        workers = [self._status(w) for w in self.pool.workers.values()]
        num_alive = sum(w.is_alive for w in workers)
        if num_alive < self.min_workers:
            return Readiness(False, f"{num_alive} of {self.min_workers} workers up", workers)
        for job in required_jobs(self.routing.mode):
            if not self.pool.alive(job):
                return Readiness(False, f"no live worker can {job}", workers)
        return Readiness(True, "", workers)

    @staticmethod
    def _status(w: WorkerHandle) -> WorkerStatus:
        s = w.stats
        usage = 1.0 - s.num_free_blocks / s.num_blocks if s and s.num_blocks else 0.0
        return WorkerStatus(
            w.worker_id,
            w.role,
            w.is_alive,
            s.num_running if s else 0,
            s.num_waiting if s else 0,
            usage,
            s.num_prefix_query_tokens if s else 0,
            s.num_prefix_hit_tokens if s else 0,
            list(s.kv_tiers) if s else [],
            s.num_tier_dropped_writes if s else 0,
        )

    async def generate(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> AsyncGenerator[StreamUpdate, None]:
        self.validate(prompt_token_ids, params)
        if request_id in self.samples.streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        child_ids = self.processor.add_request(request_id, prompt, prompt_token_ids, params)
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_token_ids))
        stream = Stream(UpdateQueue(), [])  # merges updates its reader has not taken
        self.samples.streams[request_id] = stream
        is_finished = False
        try:
            for index, child_id in enumerate(child_ids):
                sample = Sample(
                    child_id,
                    request_id,
                    list(prompt_token_ids),
                    child_params(params, index),
                    max_tokens,
                    priority,
                )
                stream.samples.append(sample)
                self.samples.children[child_id] = sample
                await self.samples.place(sample)
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                is_finished = item.finished
                yield item
                if is_finished:
                    return
        finally:
            if not is_finished:
                await self.abort(request_id)
            self.samples.forget(request_id)

    async def abort(self, request_id: str) -> None:
        self.samples.abort_request(request_id)

    # ---- operations (admin API) -----------------------------------------------------------

    def attempts_on(self, worker_id: str) -> list[Attempt]:
        return self.samples.attempts_on(worker_id)

    def move_off(self, worker_id: str, reason: str) -> int:
        """Migrate every attempt placed on `worker_id` (alive: it is told to abort)."""
        return self.samples.move_off(worker_id, reason)

    async def drain(
        self, worker_id: str, migrate: bool = True, timeout_s: float = 60.0
    ) -> DrainReport:
        return await self.drains.drain(worker_id, migrate, timeout_s)

    def forget_worker(self, worker_id: str) -> None:
        """A worker removed for good (scale in): out of the pool and the prefix index."""
        self.liveness.forget_worker(worker_id)

    def mark_dead(self, worker_id: str, reason: str) -> None:
        """The launcher saw the worker's process exit: stop using it now."""
        self.liveness.mark_dead(worker_id, reason)

    # ---- counters and state (metrics, tests) -----------------------------------------------

    @property
    def num_migrations(self) -> int:
        """Attempts started again elsewhere."""
        return self.samples.num_migrations

    @property
    def _streams(self) -> dict[str, Stream]:
        return self.samples.streams

    @property
    def _children(self) -> dict[str, Sample]:
        return self.samples.children

    @property
    def _attempts(self) -> dict[str, Attempt]:
        return self.samples.attempts

    # ---- messages from workers -----------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            data = await self._socket.recv()
            try:
                message = m.decode(data)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                logger.warning("dropping a malformed worker message: %s", e)
                continue
            try:
                self._handle(message)
            except Exception:  # a bug here must not stop every request
                logger.exception("error handling %s", type(message).__name__)

    def _handle(self, message: m.Message) -> None:
        if isinstance(message, m.WorkerStats):
            self.liveness.on_stats(message)
            return
        if isinstance(message, m.Register):
            self.liveness.on_register(message)
            return
        handle = self.pool.workers.get(getattr(message, "worker_id", ""))
        if handle is not None and not handle.is_alive:
            return  # a fenced incarnation: what it says about requests is stale
        self.membership.touch(message.worker_id)
        if isinstance(message, m.StepOutputs):
            self.inbound.on_outputs(message)
        elif isinstance(message, m.KVEvents):
            if not self.kv_index.apply(message):
                self.liveness.ask_snapshot(message.worker_id)
        elif isinstance(message, m.KVReserved):
            self.inbound.on_reserved(message)
        elif isinstance(message, m.RequestFailed):
            self.inbound.on_failed(message)
        elif isinstance(message, m.KVSent):
            self.num_kv_transfers += 1
            self.num_kv_transfer_bytes += message.num_bytes
            if self.metrics is not None:
                self.metrics.observe_kv_transfer(message.seconds, message.num_bytes)
        elif isinstance(message, m.Draining):
            self.drains.on_worker_draining(message.worker_id)
