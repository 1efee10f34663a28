"""`ClusterClient`: the `EngineClient` that drives worker processes over ZeroMQ.

It tokenises nothing (the HTTP layer does) and detokenises everything: workers exchange
token ids only, and one `OutputProcessor` here turns them into text, stop strings and
stream deltas.

Per request, each of its n samples is a `_Sample`, placed on workers by one `Attempt` at
a time (router/dispatch.py: local, or prefill on P and decode on D with KV hand-over),
charged to the load ledger (router/ledger.py). Outputs from any worker feed the output
processor; each update goes to the request's queue, which `generate` yields from.

Rooms: membership and leases live in `control/membership.py`, the retry budget in
`control/migration.py`; this module joins them to the data path:
- a worker that dies, is fenced, drained, or fails a step a sample ran in ends that
  sample's attempt (`Abort` to every other worker involved, charges released) and the
  sample *migrates*: a new attempt resumes it from the tokens already streamed;
- on finish, stop string, client disconnect or a failure, `Abort` goes to every worker
  the attempt touched, and its load is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from pdserve.config import ModelConfig
from pdserve.control.launcher import Launcher
from pdserve.control.membership import DEFAULT_LEASE_S, Membership, Outcome
from pdserve.control.migration import MigrationConfig, attempt_request_id
from pdserve.control.workers import WorkerHandle, WorkerPool
from pdserve.engine.limits import check_request
from pdserve.engine.output_processor import OutputProcessor
from pdserve.errors import (
    InvalidRequestError,
    PdserveError,
    RequestFailedError,
    ServiceUnavailableError,
)
from pdserve.ipc import messages as m
from pdserve.ipc import security
from pdserve.ipc.security import ClusterKey
from pdserve.ipc.validate import register_problem
from pdserve.outputs import StreamUpdate
from pdserve.router.client import EngineClient, Readiness, WorkerStatus
from pdserve.router.dispatch import Attempt, AttemptLost, Dispatcher, NoLiveWorker
from pdserve.router.drain import DrainReport, Drains
from pdserve.router.elastic import Elastic
from pdserve.router.kv_index import KVIndex
from pdserve.router.ledger import Charges, LoadLedger
from pdserve.router.policy import RoutingConfig, required_jobs
from pdserve.router.stream_queue import UpdateQueue
from pdserve.sampling_params import SamplingParams, child_params
from pdserve.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pdserve.control.planner import RequestLog
    from pdserve.control.planner_loop import PlannerLoop

logger = logging.getLogger(__name__)

SNAPSHOT_RETRY_S = 2.0  # ask an unsynced worker for its KV snapshot at most this often
LIVENESS_PERIOD_S = 0.25
PLACE_RETRY_S = 0.05  # between placements that found no plan
ORPHAN_GRACE_S = 3.0  # a worker busy with nothing of ours this long lost its router


@dataclass(eq=False)
class _Sample:
    """One sample of a request, across the attempts that run it."""

    child_id: str
    parent_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    priority: int = 0  # lower runs first (the engine's priority scheduling)
    output_token_ids: list[int] = field(default_factory=list)  # received, in order
    attempt: Attempt | None = None
    num_attempts: int = 0
    num_migrations: int = 0
    moving: asyncio.Task | None = None  # a migration waiting for or placing an attempt
    avoid: set[str] = field(default_factory=set)  # workers it was lost or failed on

    @property
    def reservation(self) -> asyncio.Future | None:
        return self.attempt.reservation if self.attempt is not None else None


@dataclass(eq=False)
class _Stream:
    queue: UpdateQueue
    samples: list[_Sample]


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
        self._streams: dict[str, _Stream] = {}
        self._children: dict[str, _Sample] = {}  # by child id
        self._attempts: dict[str, Attempt] = {}  # by worker-side request id
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self.num_kv_transfers = 0  # completed hand-offs, and their bytes
        self.num_kv_transfer_bytes = 0
        self.num_migrations = 0  # attempts started again elsewhere
        self._snapshot_asked: dict[str, float] = {}  # worker id -> when
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
            asyncio.create_task(self._liveness_loop()),
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
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        child_ids = self.processor.add_request(request_id, prompt, prompt_token_ids, params)
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_token_ids))
        stream = _Stream(UpdateQueue(), [])  # merges updates its reader has not taken
        self._streams[request_id] = stream
        is_finished = False
        try:
            for index, child_id in enumerate(child_ids):
                sample = _Sample(
                    child_id,
                    request_id,
                    list(prompt_token_ids),
                    child_params(params, index),
                    max_tokens,
                    priority,
                )
                stream.samples.append(sample)
                self._children[child_id] = sample
                await self._place(sample)
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
            self._forget(request_id)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        self.processor.abort_request(request_id)
        if stream is None:
            return
        for sample in stream.samples:
            self._abort_sample(sample)

    # ---- placing samples, and moving them --------------------------------------------------

    async def _place(self, sample: _Sample) -> None:
        """Start an attempt for `sample` and send it to workers; start again while the
        workers it is placed on are lost, within the migration budget."""
        deadline = time.monotonic() + self.migration.migration_wait_s
        while True:
            attempt = self._new_attempt(sample)
            try:
                await self.dispatcher.dispatch(
                    attempt,
                    sample.prompt_token_ids,
                    sample.params,
                    sample.max_tokens,
                    list(sample.output_token_ids),
                    frozenset(sample.avoid),
                    sample.priority,
                )
                return
            except AttemptLost as e:
                self._end_attempt(attempt)
                self._count_migration(sample, str(e))
                await self._wait_for_worker(sample)
            except NoLiveWorker:
                self._end_attempt(attempt)
                if not self._is_recovering(sample) or time.monotonic() > deadline:
                    raise
                await self._wait_for_worker(sample)  # a restart or a drain is under way
                await asyncio.sleep(PLACE_RETRY_S)  # roles alive, yet no plan: not a spin

    def _new_attempt(self, sample: _Sample) -> Attempt:
        outputs = sample.output_token_ids
        request_id = attempt_request_id(sample.child_id, sample.num_attempts)
        sample.num_attempts += 1
        num_tokens = len(sample.prompt_token_ids) + len(outputs)
        attempt = Attempt(request_id, sample, Charges(num_tokens), is_resumed=bool(outputs))
        sample.attempt = attempt
        self._attempts[request_id] = attempt
        return attempt

    def _end_attempt(
        self, attempt: Attempt, lost_worker: str | None = None, writer_gone: bool = False
    ) -> None:
        """Stop `attempt` on its workers (not `lost_worker`, which dropped it already) and
        release its charges. Idempotent. A reservation whose prefill worker was told to
        write is freed only once that worker is known not to (`writer_gone`, or its
        `KVDone`): with shm it writes straight into the decode worker's pool."""
        if self._attempts.pop(attempt.request_id, None) is None:
            return
        writer = attempt.prefill_worker
        is_writer_absent = writer is None or (writer == lost_worker and writer_gone)
        for worker_id in attempt.workers:
            handle = self.pool.workers.get(worker_id)
            if worker_id != lost_worker and handle is not None and handle.is_alive:
                handle.send(m.Abort([attempt.request_id], is_writer_absent))
        self.ledger.release_all(attempt.charges)
        sample = attempt.sample
        if isinstance(sample, _Sample) and sample.attempt is attempt:
            sample.attempt = None

    def _migrate(
        self, attempt: Attempt, reason: str, lost_worker: str | None, writer_gone: bool
    ) -> None:
        """End `attempt` and resume its sample elsewhere."""
        sample = attempt.sample
        if lost_worker is not None:
            sample.avoid.add(lost_worker)
        self._end_attempt(attempt, lost_worker, writer_gone)
        assert isinstance(sample, _Sample)
        if attempt.reservation is not None and not attempt.reservation.done():
            attempt.reservation.set_exception(AttemptLost(reason))  # `_place` starts again
            return
        if sample.child_id not in self._children or sample.moving is not None:
            return
        try:
            self._count_migration(sample, reason)
        except PdserveError as e:
            self._fail_request(sample.parent_id, e)
            return
        sample.moving = asyncio.get_running_loop().create_task(self._resume(sample))

    def _count_migration(self, sample: _Sample, reason: str) -> None:
        sample.num_migrations += 1
        self.num_migrations += 1
        logger.warning(
            "moving %s (%d tokens generated): %s",
            sample.child_id,
            len(sample.output_token_ids),
            reason,
        )
        if self.metrics is not None:
            self.metrics.observe_migration(len(sample.output_token_ids))
        if sample.num_migrations > self.migration.max_migrations:
            raise ServiceUnavailableError(
                f"the request lost its worker {sample.num_migrations} times "
                f"(max_migrations={self.migration.max_migrations}); last: {reason}"
            )

    async def _resume(self, sample: _Sample) -> None:
        try:
            await self._wait_for_worker(sample)
            await self._place(sample)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e if isinstance(e, PdserveError) else RequestFailedError(repr(e))
            self._fail_request(sample.parent_id, error)
        finally:
            sample.moving = None

    def _jobs(self, sample: _Sample) -> tuple[str, ...]:
        """What a new attempt of `sample` needs a live worker for."""
        mode = self.routing.mode
        if sample.output_token_ids:
            return ("mixed",) if mode == "aggregated" else ("decode",)
        return required_jobs(mode)

    def _is_recovering(self, sample: _Sample) -> bool:
        """Every role `sample` needs has a registered worker, if not a live one: one is
        restarting or draining, so waiting (`migration_wait_s`) beats failing now."""
        return all(
            any(w.can(job) for w in self.pool.workers.values()) for job in self._jobs(sample)
        )

    async def _wait_for_worker(self, sample: _Sample) -> None:
        """Until a worker can take `sample` again, at most `migration_wait_s`."""
        jobs = self._jobs(sample)
        deadline = time.monotonic() + self.migration.migration_wait_s
        while not all(self.pool.alive(job) for job in jobs):
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(
                    f"no live worker to continue the request on within "
                    f"{self.migration.migration_wait_s:g} s (migration_wait_s)"
                )
            await asyncio.sleep(0.05)

    def _abort_sample(self, sample: _Sample) -> None:
        if sample.moving is not None:
            sample.moving.cancel()
            sample.moving = None
        attempt = sample.attempt
        if attempt is not None:
            self._end_attempt(attempt)
            if attempt.reservation is not None and not attempt.reservation.done():
                attempt.reservation.cancel()
        self._children.pop(sample.child_id, None)

    def _forget(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            for sample in stream.samples:
                self._abort_sample(sample)

    # ---- operations (admin API) -----------------------------------------------------------

    def attempts_on(self, worker_id: str) -> list[Attempt]:
        return [a for a in self._attempts.values() if worker_id in a.workers]

    def move_off(self, worker_id: str, reason: str) -> int:
        """Migrate every attempt placed on `worker_id` (alive: it is told to abort)."""
        attempts = self.attempts_on(worker_id)
        for attempt in attempts:
            self._migrate(attempt, reason, lost_worker=None, writer_gone=False)
        return len(attempts)

    async def drain(
        self, worker_id: str, migrate: bool = True, timeout_s: float = 60.0
    ) -> DrainReport:
        return await self.drains.drain(worker_id, migrate, timeout_s)

    def forget_worker(self, worker_id: str) -> None:
        """A worker removed for good (scale in): out of the pool and the prefix index."""
        handle = self.pool.workers.pop(worker_id, None)
        if handle is not None:
            self.membership.fence(handle)
            handle.close()
        self.kv_index.drop_worker(worker_id)

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
            self._on_stats(message)
            return
        if isinstance(message, m.Register):
            self._on_register(message)
            return
        handle = self.pool.workers.get(getattr(message, "worker_id", ""))
        if handle is not None and not handle.is_alive:
            return  # a fenced incarnation: what it says about requests is stale
        self.membership.touch(message.worker_id)
        if isinstance(message, m.StepOutputs):
            self._on_outputs(message)
        elif isinstance(message, m.KVEvents):
            if not self.kv_index.apply(message):
                self._ask_snapshot(message.worker_id)
        elif isinstance(message, m.KVReserved):
            self._on_reserved(message)
        elif isinstance(message, m.RequestFailed):
            self._on_failed(message)
        elif isinstance(message, m.KVSent):
            self.num_kv_transfers += 1
            self.num_kv_transfer_bytes += message.num_bytes
            if self.metrics is not None:
                self.metrics.observe_kv_transfer(message.seconds, message.num_bytes)
        elif isinstance(message, m.Draining):
            self.drains.on_worker_draining(message.worker_id)

    def _on_register(self, message: m.Register) -> None:
        mc = self.model_config
        problem = register_problem(message, mc.num_layers, mc.num_kv_heads, mc.head_dim)
        if problem is not None:
            logger.warning("refusing registration of %r: %s", message.worker_id, problem)
            return
        known = self.pool.workers.get(message.worker_id)
        outcome, _ = self.membership.on_register(message)
        if outcome is Outcome.FENCED:
            self._tell_fenced(message.worker_id, message.ctrl_addr, message.incarnation)
            return
        if outcome is Outcome.REFUSED:
            logger.warning("refusing worker %s: unknown role %r", message.worker_id, message.role)
            return
        if outcome is Outcome.REFRESHED:
            return
        logger.info(
            "worker %s (%s) registered (%s)", message.worker_id, message.role, outcome.value
        )
        if outcome is Outcome.REPLACED:  # restarted: its old incarnation's requests move
            self.kv_index.drop_worker(message.worker_id)  # its snapshot follows
            if known is not None and known.is_alive:
                self._on_worker_lost(message.worker_id, "restarted", writer_gone=True)

    def _on_stats(self, stats: m.WorkerStats) -> None:
        outcome = self.membership.on_stats(stats)
        if outcome is Outcome.FENCED:
            handle = self.pool.workers[stats.worker_id]
            self._tell_fenced(stats.worker_id, handle.info.ctrl_addr, stats.incarnation)
        elif outcome is Outcome.REFRESHED:
            if stats.num_running + stats.num_waiting > 0:
                self._abort_orphans(stats)
            else:
                self.pool.workers[stats.worker_id].orphans_since = None

    def _abort_orphans(self, stats: m.WorkerStats) -> None:
        """A worker runs requests this router never gave it (the router restarted):
        nobody will read them, so it drops them and registers afresh."""
        handle = self.pool.workers[stats.worker_id]
        if handle.num_assigned or self.attempts_on(stats.worker_id):
            handle.orphans_since = None
            return
        now = time.monotonic()
        if handle.orphans_since is None:  # stats can trail an abort: wait to be sure
            handle.orphans_since = now
        elif now - handle.orphans_since > ORPHAN_GRACE_S:
            logger.warning("worker %s holds orphaned requests; fencing it", handle.worker_id)
            self.membership.fence(handle)
            self._tell_fenced(handle.worker_id, handle.info.ctrl_addr, handle.incarnation)

    def _tell_fenced(self, worker_id: str, ctrl_addr: str, incarnation: str) -> None:
        if not self.membership.should_tell_fenced(worker_id, incarnation):
            return
        handle = self.pool.workers.get(worker_id)
        if handle is not None and handle.info.ctrl_addr == ctrl_addr:
            handle.send(m.Fence(incarnation))

    def _on_reserved(self, message: m.KVReserved) -> None:
        attempt = self._attempts.get(message.request_id)
        if attempt is None or attempt.reservation is None or attempt.reservation.done():
            handle = self.pool.workers.get(message.worker_id)
            if handle is not None:  # nobody waits, and no writer was told: free now
                handle.send(m.Abort([message.request_id], is_writer_absent=True))
            return
        attempt.reservation.set_result(message)

    def _on_outputs(self, message: m.StepOutputs) -> None:
        outputs = []
        for out in message.outputs:
            attempt = self._attempts.get(out.request_id)
            if attempt is None:
                continue  # finished, aborted, or an attempt that was moved elsewhere
            for worker_id, ready in self._in_order(attempt, message.worker_id, out):
                outputs.append(self._accept(attempt, worker_id, ready))
        updates, stopped = self.processor.process_stream(outputs)
        for child_id in stopped:  # finished by a stop string: stop the workers too
            sample = self._children.get(child_id)
            if sample is not None:
                self._abort_sample(sample)
        for request_id, update in updates.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(update)

    @staticmethod
    def _in_order(
        attempt: Attempt, worker_id: str, out: m.CoreOutput
    ) -> list[tuple[str, m.CoreOutput]]:
        """The outputs that can go to the client now, in token order. Outputs of one
        sample come from several workers on separate sockets (a decode worker's second
        token can overtake the prefill worker's first), so each carries the output index
        of its first token: one past what the client has is held until the gap fills,
        tokens the client already has are cut off (NOTE: the stream never shows a token
        twice or out of place)."""
        sample = attempt.sample
        assert isinstance(sample, _Sample)
        if out.first_index is None:  # a worker that does not say: trust the arrival order
            return [(worker_id, out)]
        attempt.pending.setdefault(out.first_index, []).append((worker_id, out))
        ready: list[tuple[str, m.CoreOutput]] = []
        expected = len(sample.output_token_ids)
        while attempt.pending:
            index = min(attempt.pending)
            if index > expected:
                break  # a gap: wait for the missing tokens
            held = attempt.pending[index]
            w, o = held.pop(0)
            if not held:
                del attempt.pending[index]
            skip = expected - index
            if skip:
                logprobs = o.new_logprobs[skip:] if o.new_logprobs is not None else None
                tokens = o.new_token_ids[skip:]
                o = msgspec.structs.replace(
                    o, new_token_ids=tokens, new_logprobs=logprobs, first_index=expected
                )
                if not tokens and o.finish_reason is None:
                    continue
            ready.append((w, o))
            expected += len(o.new_token_ids)
            if o.finish_reason is not None:
                break
        return ready

    def _accept(self, attempt: Attempt, worker_id: str, out: m.CoreOutput):
        """Account one in-order output of `attempt`; its engine output for the client."""
        sample = attempt.sample
        assert isinstance(sample, _Sample)
        self.ledger.prefill_done(attempt.charges)  # any output: the prompt is computed
        if out.finish_reason is not None or worker_id == attempt.prefill_worker:
            self.ledger.release(attempt.charges, worker_id)  # done on that worker
            attempt.workers.discard(worker_id)
        if out.finish_reason is not None:
            self._finish_attempt(attempt)
        if out.queue_time_s is not None and not attempt.is_resumed:
            self._note_queue_time(sample.parent_id, out.queue_time_s)
        sample.output_token_ids += out.new_token_ids
        engine_out = out.to_engine_output()
        engine_out.request_id = sample.child_id
        if attempt.is_resumed:  # its prompt included outputs: not the client's cache
            if self.metrics is not None and not attempt.has_output:
                num_cached = engine_out.num_cached_tokens
                self.metrics.observe_migration_replay(attempt.charges.num_prompt_tokens, num_cached)
            engine_out.num_cached_tokens = 0
        attempt.has_output = True
        return engine_out

    def _finish_attempt(self, attempt: Attempt) -> None:
        self._attempts.pop(attempt.request_id, None)
        self.ledger.release_all(attempt.charges)
        sample = attempt.sample
        assert isinstance(sample, _Sample)
        sample.attempt = None
        self._children.pop(sample.child_id, None)

    def _note_queue_time(self, request_id: str, queue_time_s: float) -> None:
        """The worker measured its queue on its own clock; place it on ours."""
        state = self.processor.states.get(request_id)
        if state is not None and state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = state.metrics.arrival_time + queue_time_s

    def _on_failed(self, message: m.RequestFailed) -> None:
        attempt = self._attempts.get(message.request_id)
        if attempt is None:
            return
        reason = f"worker {message.worker_id}: {message.message}"
        if message.retryable:
            self._migrate(attempt, reason, lost_worker=message.worker_id, writer_gone=False)
            return
        sample = attempt.sample
        assert isinstance(sample, _Sample)
        if attempt.reservation is not None and not attempt.reservation.done():
            self._end_attempt(attempt, lost_worker=message.worker_id)
            attempt.reservation.set_exception(ServiceUnavailableError(message.message))
            return
        self._fail_request(sample.parent_id, RequestFailedError(reason))

    def _fail_request(self, request_id: str, error: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        for sample in stream.samples:
            self._abort_sample(sample)
        self.processor.abort_request(request_id)
        stream.queue.put_nowait(error)

    # ---- liveness --------------------------------------------------------------------------

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_PERIOD_S)
            try:
                self._check_liveness()
            except Exception:  # this loop must outlive any bug in one pass
                logger.exception("liveness check failed")

    def _check_liveness(self) -> None:
        for expiry in self.membership.find_expired():
            worker_id = expiry.handle.worker_id
            self.membership.fence(expiry.handle)
            self._on_worker_lost(worker_id, expiry.reason, writer_gone=False)
            if self.on_worker_expired is not None:
                self.on_worker_expired(worker_id)
        for handle in self.pool.workers.values():
            if handle.is_alive and not self.kv_index.is_synced(handle.worker_id):
                self._ask_snapshot(handle.worker_id)  # e.g. this router just started

    def _ask_snapshot(self, worker_id: str) -> None:
        """Ask a worker for its KV snapshot (its index entry is unsynced), at most every
        `SNAPSHOT_RETRY_S`: the batches it sent meanwhile are refused too."""
        handle = self.pool.workers.get(worker_id)
        now = time.monotonic()
        if handle is None or now - self._snapshot_asked.get(worker_id, -1e9) < SNAPSHOT_RETRY_S:
            return
        self._snapshot_asked[worker_id] = now
        handle.send(m.SendKVSnapshot())

    def mark_dead(self, worker_id: str, reason: str) -> None:
        """The launcher saw the worker's process exit: stop using it now."""
        handle = self.pool.workers.get(worker_id)
        if handle is None:
            return
        was_alive = handle.is_alive
        self.membership.fence(handle)
        if was_alive:
            self._on_worker_lost(worker_id, reason, writer_gone=True)

    def _on_worker_lost(self, worker_id: str, reason: str, writer_gone: bool) -> None:
        logger.error("worker %s %s; moving its requests", worker_id, reason)
        self.kv_index.drop_worker(worker_id)
        for attempt in self.attempts_on(worker_id):
            self._migrate(attempt, f"worker {worker_id} {reason}", worker_id, writer_gone)
