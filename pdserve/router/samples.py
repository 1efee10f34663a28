"""`Samples`: the router's ledger of live requests, their samples and the attempts that
run them, and moving a sample to another worker when its attempt is lost.

A request is a `Stream` (the queue its caller reads) of `n` `Sample`s. A sample runs as one
`Attempt` at a time (router/dispatch.py), each with its own worker-side request id and its
own charges in the load ledger (router/ledger.py). Ending an attempt (finish, abort,
failure, lost worker) is one idempotent step: `Abort` to every other worker it touched, its
charges released. A lost attempt *migrates*: a new attempt resumes the sample from the
tokens already streamed, within the retry budget of control/migration.py
(`max_migrations`, `migration_wait_s`).

It is its own object, apart from `ClusterClient` (router/cluster.py), because this is the
state every other part of the router reads and changes: the message handlers
(router/inbound.py), liveness (router/liveness.py) and drains all end or move attempts
through it, never by editing the dicts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.control.migration import MigrationConfig, attempt_request_id
from pdserve.control.workers import WorkerPool
from pdserve.engine.output_processor import OutputProcessor
from pdserve.errors import PdserveError, RequestFailedError, ServiceUnavailableError
from pdserve.ipc import messages as m
from pdserve.router.dispatch import Attempt, AttemptLost, Dispatcher, NoLiveWorker
from pdserve.router.ledger import Charges, LoadLedger
from pdserve.router.policy import RoutingConfig, required_jobs
from pdserve.router.stream_queue import UpdateQueue
from pdserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.router.metrics import RouterMetrics

logger = logging.getLogger(__name__)

PLACE_RETRY_S = 0.05  # between placements that found no plan


@dataclass(eq=False)
class Sample:
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
class Stream:
    """One request: the queue its caller reads, and its samples."""

    queue: UpdateQueue
    samples: list[Sample]


class Samples:
    def __init__(
        self,
        pool: WorkerPool,
        ledger: LoadLedger,
        dispatcher: Dispatcher,
        processor: OutputProcessor,
        migration: MigrationConfig,
        routing: Callable[[], RoutingConfig],
        metrics: Callable[[], RouterMetrics | None],
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.dispatcher = dispatcher
        self.processor = processor
        self.migration = migration
        self._routing = routing
        self._metrics = metrics
        self.streams: dict[str, Stream] = {}  # by request id
        self.children: dict[str, Sample] = {}  # by child id
        self.attempts: dict[str, Attempt] = {}  # by worker-side request id
        self.num_migrations = 0  # attempts started again elsewhere

    def attempts_on(self, worker_id: str) -> list[Attempt]:
        return [a for a in self.attempts.values() if worker_id in a.workers]

    # ---- placing samples, and moving them --------------------------------------------------

    async def place(self, sample: Sample) -> None:
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
                self.end_attempt(attempt)
                self._count_migration(sample, str(e))
                await self._wait_for_worker(sample)
            except NoLiveWorker:
                self.end_attempt(attempt)
                if not self._is_recovering(sample) or time.monotonic() > deadline:
                    raise
                await self._wait_for_worker(sample)  # a restart or a drain is under way
                await asyncio.sleep(PLACE_RETRY_S)  # roles alive, yet no plan: not a spin

    def _new_attempt(self, sample: Sample) -> Attempt:
        outputs = sample.output_token_ids
        request_id = attempt_request_id(sample.child_id, sample.num_attempts)
        sample.num_attempts += 1
        num_tokens = len(sample.prompt_token_ids) + len(outputs)
        attempt = Attempt(request_id, sample, Charges(num_tokens), is_resumed=bool(outputs))
        sample.attempt = attempt
        self.attempts[request_id] = attempt
        return attempt

    def end_attempt(
        self, attempt: Attempt, lost_worker: str | None = None, writer_gone: bool = False
    ) -> None:
        """Stop `attempt` on its workers (not `lost_worker`, which dropped it already) and
        release its charges. Idempotent. A reservation whose prefill worker was told to
        write is freed only once that worker is known not to (`writer_gone`, or its
        `KVDone`): with shm it writes straight into the decode worker's pool."""
        if self.attempts.pop(attempt.request_id, None) is None:
            return
        writer = attempt.prefill_worker
        is_writer_absent = writer is None or (writer == lost_worker and writer_gone)
        for worker_id in attempt.workers:
            handle = self.pool.workers.get(worker_id)
            if worker_id != lost_worker and handle is not None and handle.is_alive:
                handle.send(m.Abort([attempt.request_id], is_writer_absent))
        self.ledger.release_all(attempt.charges)
        sample = attempt.sample
        if isinstance(sample, Sample) and sample.attempt is attempt:
            sample.attempt = None

    def finish_attempt(self, attempt: Attempt) -> None:
        """`attempt` finished on its last worker: nothing is left to tell anyone."""
        self.attempts.pop(attempt.request_id, None)
        self.ledger.release_all(attempt.charges)
        sample = attempt.sample
        assert isinstance(sample, Sample)
        sample.attempt = None
        self.children.pop(sample.child_id, None)

    def migrate(
        self, attempt: Attempt, reason: str, lost_worker: str | None, writer_gone: bool
    ) -> None:
        """End `attempt` and resume its sample elsewhere."""
        sample = attempt.sample
        if lost_worker is not None:
            sample.avoid.add(lost_worker)
        self.end_attempt(attempt, lost_worker, writer_gone)
        assert isinstance(sample, Sample)
        if attempt.reservation is not None and not attempt.reservation.done():
            attempt.reservation.set_exception(AttemptLost(reason))  # `place` starts again
            return
        if sample.child_id not in self.children or sample.moving is not None:
            return
        try:
            self._count_migration(sample, reason)
        except PdserveError as e:
            self.fail_request(sample.parent_id, e)
            return
        sample.moving = asyncio.get_running_loop().create_task(self._resume(sample))

    def move_off(self, worker_id: str, reason: str) -> int:
        """Migrate every attempt placed on `worker_id` (alive: it is told to abort)."""
        attempts = self.attempts_on(worker_id)
        for attempt in attempts:
            self.migrate(attempt, reason, lost_worker=None, writer_gone=False)
        return len(attempts)

    def _count_migration(self, sample: Sample, reason: str) -> None:
        sample.num_migrations += 1
        self.num_migrations += 1
        logger.warning(
            "moving %s (%d tokens generated): %s",
            sample.child_id,
            len(sample.output_token_ids),
            reason,
        )
        metrics = self._metrics()
        if metrics is not None:
            metrics.observe_migration(len(sample.output_token_ids))
        if sample.num_migrations > self.migration.max_migrations:
            raise ServiceUnavailableError(
                f"the request lost its worker {sample.num_migrations} times "
                f"(max_migrations={self.migration.max_migrations}); last: {reason}"
            )

    async def _resume(self, sample: Sample) -> None:
        try:
            await self._wait_for_worker(sample)
            await self.place(sample)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e if isinstance(e, PdserveError) else RequestFailedError(repr(e))
            self.fail_request(sample.parent_id, error)
        finally:
            sample.moving = None

    def _jobs(self, sample: Sample) -> tuple[str, ...]:
        """What a new attempt of `sample` needs a live worker for."""
        mode = self._routing().mode
        if sample.output_token_ids:
            return ("mixed",) if mode == "aggregated" else ("decode",)
        return required_jobs(mode)

    def _is_recovering(self, sample: Sample) -> bool:
        """Every role `sample` needs has a registered worker, if not a live one: one is
        restarting or draining, so waiting (`migration_wait_s`) beats failing now."""
        return all(
            any(w.can(job) for w in self.pool.workers.values()) for job in self._jobs(sample)
        )

    async def _wait_for_worker(self, sample: Sample) -> None:
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

    # ---- ending requests -------------------------------------------------------------------

    def abort_sample(self, sample: Sample) -> None:
        if sample.moving is not None:
            sample.moving.cancel()
            sample.moving = None
        attempt = sample.attempt
        if attempt is not None:
            self.end_attempt(attempt)
            if attempt.reservation is not None and not attempt.reservation.done():
                attempt.reservation.cancel()
        self.children.pop(sample.child_id, None)

    def abort_request(self, request_id: str) -> None:
        """Stop every sample of the request; its stream stays until `forget`."""
        stream = self.streams.get(request_id)
        self.processor.abort_request(request_id)
        if stream is None:
            return
        for sample in stream.samples:
            self.abort_sample(sample)

    def fail_request(self, request_id: str, error: Exception) -> None:
        """Stop the request and hand `error` to its reader."""
        stream = self.streams.get(request_id)
        if stream is None:
            return
        for sample in stream.samples:
            self.abort_sample(sample)
        self.processor.abort_request(request_id)
        stream.queue.put_nowait(error)

    def forget(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            for sample in stream.samples:
                self.abort_sample(sample)
