"""`ClusterClient`: the `EngineClient` that drives worker processes over ZeroMQ.

It tokenises nothing (the HTTP layer does) and detokenises everything: workers exchange
token ids only, and one `OutputProcessor` here turns them into text, stop strings and
stream deltas.

Per request (each of its n samples is its own worker request), in `generate`:
1. Plan (`router/policy.py`): the whole request on one worker, or prefill on a prefill
   worker P and decode on a decode worker D. The routing policy sees how much of the
   prompt each worker already holds: the global prefix index (`router/kv_index.py`), fed
   by the workers' `KVEvents`, matched against the prompt's block hashes.
2. Remote: D reserves blocks (`ReserveKV` → `KVReserved`; D queues it while full, so
   the request waits for room); then P gets `PrefillRequest` with D's block ids and streams
   the KV into them — only into the blocks past the prefix D already had cached (delta
   hand-over: `KVReserved.num_cached_blocks`, `KVDestination.first_block`). P's first
   token comes straight back here; D continues from it.
3. Outputs from any worker feed the output processor; each update goes to the request's
   queue, which `generate` yields from.
4. On finish, stop string, client disconnect, failure or a dead worker: `Abort` goes to
   every worker the request touched, and its load is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from pdserve.config import ModelConfig
from pdserve.engine.limits import check_request
from pdserve.engine.output_processor import OutputProcessor
from pdserve.errors import InvalidRequestError, RequestFailedError, ServiceUnavailableError
from pdserve.ipc import messages as m
from pdserve.outputs import StreamUpdate
from pdserve.router.client import EngineClient, Readiness, WorkerStatus
from pdserve.router.kv_index import KVIndex, PrefixMatch, prompt_hashes
from pdserve.router.policy import Plan, RoutingConfig, plan_request, required_jobs
from pdserve.router.stream_queue import UpdateQueue
from pdserve.router.workers import WorkerHandle, WorkerPool
from pdserve.sampling_params import SamplingParams, child_params
from pdserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ROUTER_MARGIN_S = 1.0  # the prefill deadline ends this much before the reservation's
SNAPSHOT_RETRY_S = 2.0  # ask an unsynced worker for its KV snapshot at most this often


@dataclass(eq=False)
class _Child:
    """One sample of a request, as assigned to workers."""

    child_id: str
    parent_id: str
    num_prompt_tokens: int
    max_tokens: int
    loads: dict[str, int] = field(default_factory=dict)  # worker id -> tokens charged
    prefilling: tuple[str, int] | None = None  # (worker id, prompt tokens) until 1st token
    prefill_worker: str | None = None
    reservation: asyncio.Future | None = None
    priority: int = 0


@dataclass(eq=False)
class _Stream:
    queue: UpdateQueue
    children: list[_Child]


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
        liveness_timeout_s: float = 10.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_config = ModelConfig.from_pretrained(model_dir)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        self.model_name = model_name or self.model_dir.name
        self._max_model_len = max_model_len or self.model_config.max_position_embeddings
        self.routing = routing or RoutingConfig()
        self.router_addr = router_addr
        self.min_workers = min_workers
        self.metrics = metrics
        self.ctx = zmq.asyncio.Context()
        self.pool = WorkerPool(self.ctx, liveness_timeout_s)
        self.processor = OutputProcessor(self.tokenizer)
        self._streams: dict[str, _Stream] = {}
        self._children: dict[str, _Child] = {}
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self.num_kv_transfers = 0  # completed hand-offs, and their bytes
        self.num_kv_transfer_bytes = 0
        self.kv_index = KVIndex()
        self._snapshot_asked: dict[str, float] = {}  # worker id -> when
        self._selector = self.routing.selector()  # keeps round-robin turns
        self._selector_routing = self.routing

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket workers report to and start listening (inside the event loop)."""
        self._socket = self.ctx.socket(zmq.PULL)
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
                child = _Child(child_id, request_id, len(prompt_token_ids), max_tokens)
                child.priority = priority
                stream.children.append(child)
                self._children[child_id] = child
                await self._dispatch(child, prompt_token_ids, child_params(params, index))
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
        for child in stream.children:
            self._abort_child(child)

    # ---- dispatch ---------------------------------------------------------------------------

    async def _dispatch(self, child: _Child, token_ids: list[int], params: SamplingParams):
        matches = self._prefix_matches(token_ids)

        def cached(worker: WorkerHandle) -> int:
            match = matches.get(worker.worker_id)
            return match.num_blocks * worker.info.kv_layout.block_size if match else 0

        plan = plan_request(self.pool, self.routing, len(token_ids), cached, self._policy())
        if plan is None:
            raise ServiceUnavailableError(
                f"no live worker for mode {self.routing.mode!r}; retry later"
            )
        if self.metrics is not None:
            worker = plan.prefill or plan.decode
            self.metrics.observe_routing(
                self.routing.routing_policy,
                plan,
                len(token_ids),
                matches.get(worker.worker_id),
                worker.info.kv_layout.block_size,
            )
        if plan.prefill is None:
            self._charge(child, plan.decode, child.num_prompt_tokens + child.max_tokens)
            self._charge_prefill(child, plan.decode, cached(plan.decode))
            plan.decode.send(m.AddRequest(child.child_id, token_ids, params, child.priority))
            return
        await self._dispatch_remote(child, plan, token_ids, params, cached(plan.prefill))

    async def _dispatch_remote(
        self,
        child: _Child,
        plan: Plan,
        token_ids: list[int],
        params: SamplingParams,
        num_cached_on_prefill: int = 0,
    ) -> None:
        timeout = self.routing.kv_transfer_timeout_s
        transfer_id = uuid.uuid4().hex
        child.reservation = asyncio.get_running_loop().create_future()
        self._charge(child, plan.decode, child.max_tokens)
        plan.decode.send(
            m.ReserveKV(child.child_id, transfer_id, token_ids, params, timeout, child.priority)
        )
        try:
            # NOTE: asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation (client gone) that races with the reservation arriving.
            async with asyncio.timeout(timeout):
                reserved = await child.reservation
        except TimeoutError:
            raise ServiceUnavailableError("no decode worker had room in time") from None
        base = time.monotonic()
        prefill = plan.prefill
        backend = self._backend(prefill, plan.decode)
        num_cached = reserved.num_cached_blocks  # already on the decode worker: not sent
        dest = m.KVDestination(
            worker_id=plan.decode.worker_id,
            transfer_id=transfer_id,
            block_ids=reserved.block_ids[num_cached:],
            kv_addr=plan.decode.info.kv_addr,
            backend=backend,
            shm_path=plan.decode.info.shm_path,
            nixl=plan.decode.info.nixl,
            wire_dtype=self._wire_dtype(backend),
            first_block=num_cached,
        )
        child.prefill_worker = prefill.worker_id
        self._charge(child, prefill, child.num_prompt_tokens)
        self._charge_prefill(child, prefill, num_cached_on_prefill)
        deadline = timeout - (time.monotonic() - base) - ROUTER_MARGIN_S
        prefill.send(
            m.PrefillRequest(child.child_id, token_ids, params, dest, deadline, child.priority)
        )

    def _backend(self, prefill: WorkerHandle, decode: WorkerHandle) -> str:
        wanted = self.routing.kv_backend
        common = set(prefill.info.backends) & set(decode.info.backends)
        if wanted != "auto":
            if wanted not in common:
                raise ServiceUnavailableError(
                    f"workers {prefill.worker_id} and {decode.worker_id} do not both "
                    f"support KV backend {wanted!r}"
                )
            return wanted
        same_host = prefill.info.hostname == decode.info.hostname
        if same_host and "shm" in common and decode.info.shm_path:
            return "shm"
        if "nixl" in common and decode.info.nixl is not None:
            return "nixl"
        if "tcp" in common:
            return "tcp"
        raise ServiceUnavailableError("the chosen workers share no KV transfer backend")

    def _policy(self):
        """The routing policy's selector, made again when `routing` was replaced."""
        if self._selector_routing is not self.routing:
            self._selector = self.routing.selector()
            self._selector_routing = self.routing
        return self._selector

    def _prefix_matches(self, token_ids: list[int]) -> dict[str, PrefixMatch]:
        """Each live worker's cached prefix of the prompt (by its block size)."""
        by_size: dict[int, list[str]] = {}
        for handle in self.pool.workers.values():
            if handle.is_alive:
                by_size.setdefault(handle.info.kv_layout.block_size, []).append(handle.worker_id)
        matches: dict[str, PrefixMatch] = {}
        for block_size, worker_ids in by_size.items():
            hashes = prompt_hashes(token_ids, block_size)
            matches.update(self.kv_index.match(hashes, worker_ids))
        return matches

    def _wire_dtype(self, backend: str) -> str | None:
        """int8 KV on the wire is opt-in and tcp only: shm and nixl write in place."""
        return "int8" if backend == "tcp" and self.routing.kv_wire_dtype == "int8" else None

    def _charge(self, child: _Child, worker: WorkerHandle, tokens: int) -> None:
        child.loads[worker.worker_id] = child.loads.get(worker.worker_id, 0) + tokens
        worker.outstanding_tokens += tokens
        worker.num_assigned += 1

    def _charge_prefill(self, child: _Child, worker: WorkerHandle, num_cached: int) -> None:
        """Count the prompt tokens `worker` will compute (those past its cached prefix)
        until the first token comes back."""
        tokens = max(0, child.num_prompt_tokens - num_cached)
        child.prefilling = (worker.worker_id, tokens)
        worker.pending_prefill_tokens += tokens

    def _prefill_done(self, child: _Child) -> None:
        if child.prefilling is None:
            return
        worker_id, tokens = child.prefilling
        child.prefilling = None
        handle = self.pool.workers.get(worker_id)
        if handle is not None:
            handle.pending_prefill_tokens -= tokens

    def _release(self, child: _Child, worker_id: str) -> None:
        if child.prefilling is not None and child.prefilling[0] == worker_id:
            self._prefill_done(child)
        tokens = child.loads.pop(worker_id, 0)
        handle = self.pool.workers.get(worker_id)
        if handle is not None and tokens:
            handle.outstanding_tokens -= tokens
            handle.num_assigned -= 1

    def _abort_child(self, child: _Child) -> None:
        for worker_id in list(child.loads):
            handle = self.pool.workers.get(worker_id)
            if handle is not None:
                handle.send(m.Abort([child.child_id], child.prefill_worker is None))
            self._release(child, worker_id)
        if child.reservation is not None and not child.reservation.done():
            child.reservation.cancel()
        self._children.pop(child.child_id, None)

    def _forget(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            for child in stream.children:
                if child.loads:
                    self._abort_child(child)
                self._children.pop(child.child_id, None)

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
            self.pool.on_stats(message)
            return
        if isinstance(message, m.Register):
            known = self.pool.workers.get(message.worker_id)
            self.pool.register(message)
            if known is None or known.info != message:
                logger.info("worker %s (%s) registered", message.worker_id, message.role)
                if known is not None:  # restarted: its snapshot follows on the same socket
                    self.kv_index.drop_worker(message.worker_id)
            return
        self.pool.touch(message.worker_id)
        if isinstance(message, m.StepOutputs):
            self._on_outputs(message)
        elif isinstance(message, m.KVEvents):
            if not self.kv_index.apply(message):
                self._ask_snapshot(message.worker_id)
        elif isinstance(message, m.KVReserved):
            child = self._children.get(message.request_id)
            if child is None or child.reservation is None or child.reservation.done():
                handle = self.pool.workers.get(message.worker_id)
                if handle is not None:  # nobody waits, and no writer was told: free now
                    handle.send(m.Abort([message.request_id], is_writer_absent=True))
                return
            child.reservation.set_result(message)
        elif isinstance(message, m.RequestFailed):
            self._on_failed(message)
        elif isinstance(message, m.KVSent):
            self.num_kv_transfers += 1
            self.num_kv_transfer_bytes += message.num_bytes
            if self.metrics is not None:
                self.metrics.observe_kv_transfer(message.seconds, message.num_bytes)

    def _on_outputs(self, message: m.StepOutputs) -> None:
        outputs = []
        for out in message.outputs:
            child = self._children.get(out.request_id)
            if child is None:
                continue
            self._prefill_done(child)  # any output means the prompt is computed
            if out.finish_reason is not None or message.worker_id == child.prefill_worker:
                self._release(child, message.worker_id)  # done on that worker
            if out.finish_reason is not None:
                self._release_all(child)
            if out.queue_time_s is not None:
                self._note_queue_time(child.parent_id, out.queue_time_s)
            outputs.append(out.to_engine_output())
        updates, stopped = self.processor.process_stream(outputs)
        for child_id in stopped:  # finished by a stop string: stop the workers too
            child = self._children.get(child_id)
            if child is not None:
                self._abort_child(child)
        for request_id, update in updates.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(update)

    def _note_queue_time(self, request_id: str, queue_time_s: float) -> None:
        """The worker measured its queue on its own clock; place it on ours."""
        state = self.processor.states.get(request_id)
        if state is not None and state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = state.metrics.arrival_time + queue_time_s

    def _release_all(self, child: _Child) -> None:
        for worker_id in list(child.loads):
            self._release(child, worker_id)
        self._children.pop(child.child_id, None)

    def _on_failed(self, message: m.RequestFailed) -> None:
        child = self._children.get(message.request_id)
        if child is None:
            return
        error = RequestFailedError(f"worker {message.worker_id}: {message.message}")
        if child.reservation is not None and not child.reservation.done():
            child.reservation.set_exception(ServiceUnavailableError(message.message))
            return
        self._fail_request(child.parent_id, error)

    def _fail_request(self, request_id: str, error: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        for child in stream.children:
            self._abort_child(child)
        self.processor.abort_request(request_id)
        stream.queue.put_nowait(error)

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for handle in self.pool.find_dead():
                self._on_worker_lost(handle.worker_id, "stopped responding")
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
        if handle is not None and handle.is_alive:
            handle.is_alive = False
            self._on_worker_lost(worker_id, reason)

    def _on_worker_lost(self, worker_id: str, reason: str) -> None:
        logger.error("worker %s %s; failing its requests", worker_id, reason)
        self.kv_index.drop_worker(worker_id)
        for child in list(self._children.values()):
            if worker_id in child.loads:
                child.loads.pop(worker_id)  # nothing to abort or release there
                if child.prefilling is not None and child.prefilling[0] == worker_id:
                    self._prefill_done(child)
                if child.prefill_worker == worker_id:
                    child.prefill_worker = None  # a dead writer: the decode side frees at once
                self._fail_request(
                    child.parent_id, RequestFailedError(f"worker {worker_id} {reason}")
                )
