"""Dispatch: one attempt at running a request sample on workers.

An `Attempt` is one placement of a sample: a plan (router/policy.py), the commands that
carry it out, and the charges it made (router/ledger.py). A sample has one attempt at a
time; a new one starts when the old one's worker died, was drained or failed its step
(control/migration.py). Each attempt has its own worker-side request id, so nothing an
old attempt's worker still says can reach the new attempt's stream.

Local: the whole sample on one worker (`AddRequest`; a resumed sample carries the tokens
it already generated). Remote: the decode worker D reserves blocks (`ReserveKV` →
`KVReserved`; D queues it while full, so the request waits for room); then the prefill
worker P gets `PrefillRequest` with D's block ids past the prefix D already had (delta
hand-over) and streams the KV into them. P's first token comes straight back to the
router; D continues from it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.control.workers import WorkerHandle, WorkerPool
from pdserve.errors import ServiceUnavailableError
from pdserve.ipc import messages as m
from pdserve.kv.block_hash import BlockHash
from pdserve.router.kv_index import KVIndex, PrefixMatch, prompt_hashes
from pdserve.router.ledger import Charges, LoadLedger
from pdserve.router.policy import Plan, RoutingConfig, plan_request
from pdserve.router.prefixes import HotPrefixes
from pdserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.router.metrics import RouterMetrics

ROUTER_MARGIN_S = 1.0  # the prefill deadline ends this much before the reservation's


class NoLiveWorker(ServiceUnavailableError):
    """No live worker of a role the request needs (all dead, restarting or draining)."""


class AttemptLost(Exception):
    """A worker of an attempt being placed died or was drained: place the sample again."""


@dataclass(eq=False)
class Attempt:
    request_id: str  # what the workers call it
    sample: object  # the router's per-sample state (router/samples.py)
    charges: Charges
    prefill_worker: str | None = None  # told to write KV into a reservation
    reservation: asyncio.Future | None = None
    is_resumed: bool = False  # it continues generated tokens (a migration)
    has_output: bool = False  # a token of it came back
    workers: set[str] = field(default_factory=set)  # every worker told about it
    # Outputs that arrived ahead of a gap, by output index (router/inbound.py in_order).
    pending: dict[int, list] = field(default_factory=dict)


class Dispatcher:
    def __init__(
        self,
        pool: WorkerPool,
        ledger: LoadLedger,
        kv_index: KVIndex,
        routing: Callable[[], RoutingConfig],
        metrics: Callable[[], RouterMetrics | None],
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.kv_index = kv_index
        self._routing = routing
        self._metrics = metrics
        self._selector = None
        self._selector_routing: RoutingConfig | None = None
        self.prefixes = HotPrefixes()  # what /admin/prefixes reports (router/prefixes.py)

    async def dispatch(
        self,
        attempt: Attempt,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        output_token_ids: list[int],
        avoid: frozenset[str] = frozenset(),
        priority: int = 0,
    ) -> None:
        """Send `attempt` to workers; returns once every command is out (for a remote
        prefill, after the decode worker reserved blocks). Raises
        `ServiceUnavailableError` when no worker can take it, `AttemptLost` when a
        worker it was placed on died meanwhile. `avoid`: workers it failed on before
        (passed over while the role has another)."""
        token_ids = prompt_token_ids + output_token_ids  # what the workers compute
        matches, hashes = self._prefix_matches(token_ids)

        def cached(worker: WorkerHandle) -> int:
            match = matches.get(worker.worker_id)
            return match.num_blocks * worker.info.kv_layout.block_size if match else 0

        routing = self._routing()
        if output_token_ids:  # resumed: recompute locally on a decode-capable worker
            plan = self._plan_local(routing, len(token_ids), cached, avoid)
        else:
            plan = plan_request(self.pool, routing, len(token_ids), cached, self._policy(), avoid)
        if plan is None:
            raise NoLiveWorker(f"no live worker for mode {routing.mode!r}; retry later")
        self._observe(routing, plan, len(token_ids), matches)
        if not output_token_ids:  # a fresh sample: one more sighting of its prefixes
            worker = plan.prefill or plan.decode
            size = worker.info.kv_layout.block_size
            self.prefixes.record(hashes.get(size, []), size, worker.worker_id)
        remaining = max_tokens - len(output_token_ids)
        if plan.prefill is None:
            self._charge(attempt, plan.decode, len(token_ids) + remaining)
            self.ledger.charge_prefill(attempt.charges, plan.decode, cached(plan.decode))
            plan.decode.send(
                m.AddRequest(
                    attempt.request_id,
                    prompt_token_ids,
                    params,
                    priority=priority,
                    output_token_ids=output_token_ids,
                )
            )
            return
        await self._dispatch_remote(attempt, plan, token_ids, params, remaining, cached, priority)

    def _plan_local(
        self, routing: RoutingConfig, num_tokens: int, cached, avoid: frozenset[str]
    ) -> Plan | None:
        job = "mixed" if routing.mode == "aggregated" else "decode"
        candidates = self.pool.alive(job)
        candidates = [w for w in candidates if w.worker_id not in avoid] or candidates
        if not candidates:
            return None
        choice = self._policy().pick(candidates, job, num_tokens, cached)
        return Plan(choice.worker, picks=((job, choice.reason),), placement=("local", "resume"))

    async def _dispatch_remote(
        self,
        attempt: Attempt,
        plan: Plan,
        token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        cached,
        priority: int,
    ) -> None:
        timeout = self._routing().kv_transfer_timeout_s
        transfer_id = uuid.uuid4().hex
        attempt.reservation = asyncio.get_running_loop().create_future()
        self._charge(attempt, plan.decode, max_tokens)
        plan.decode.send(
            m.ReserveKV(
                attempt.request_id, transfer_id, token_ids, params, timeout, priority=priority
            )
        )
        try:
            # NOTE: asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation (client gone) that races with the reservation arriving.
            async with asyncio.timeout(timeout):
                reserved = await attempt.reservation
        except TimeoutError:
            raise ServiceUnavailableError("no decode worker had room in time") from None
        base = time.monotonic()
        prefill = plan.prefill
        if not prefill.is_accepting:  # died or drained while the decode worker reserved
            raise AttemptLost(f"prefill worker {prefill.worker_id} left")
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
        attempt.prefill_worker = prefill.worker_id
        self._charge(attempt, prefill, len(token_ids))
        self.ledger.charge_prefill(attempt.charges, prefill, cached(prefill))
        deadline = timeout - (time.monotonic() - base) - ROUTER_MARGIN_S
        prefill.send(
            m.PrefillRequest(
                attempt.request_id, token_ids, params, dest, deadline, priority=priority
            )
        )

    def _charge(self, attempt: Attempt, worker: WorkerHandle, tokens: int) -> None:
        attempt.workers.add(worker.worker_id)
        self.ledger.charge(attempt.charges, worker, tokens)

    def _observe(self, routing, plan: Plan, num_tokens: int, matches) -> None:
        metrics = self._metrics()
        if metrics is None:
            return
        worker = plan.prefill or plan.decode
        metrics.observe_routing(
            routing.routing_policy,
            plan,
            num_tokens,
            matches.get(worker.worker_id),
            worker.info.kv_layout.block_size,
        )

    def _backend(self, prefill: WorkerHandle, decode: WorkerHandle) -> str:
        wanted = self._routing().kv_backend
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
        """The routing policy's selector, made again when the routing config changed."""
        routing = self._routing()
        if self._selector_routing is not routing:
            self._selector = routing.selector()
            self._selector_routing = routing
        return self._selector

    def _prefix_matches(
        self, token_ids: list[int]
    ) -> tuple[dict[str, PrefixMatch], dict[int, list[BlockHash]]]:
        """Each live worker's cached prefix of the prompt (by its block size), and the
        prompt's block hashes by block size."""
        by_size: dict[int, list[str]] = {}
        for handle in self.pool.workers.values():
            if handle.is_alive:
                by_size.setdefault(handle.info.kv_layout.block_size, []).append(handle.worker_id)
        matches: dict[str, PrefixMatch] = {}
        hashes_by_size: dict[int, list[BlockHash]] = {}
        for block_size, worker_ids in by_size.items():
            hashes = hashes_by_size[block_size] = prompt_hashes(token_ids, block_size)
            matches.update(self.kv_index.match(hashes, worker_ids))
        return matches, hashes_by_size

    def _wire_dtype(self, backend: str) -> str | None:
        """int8 KV on the wire is opt-in and tcp only: shm and nixl write in place."""
        return "int8" if backend == "tcp" and self._routing().kv_wire_dtype == "int8" else None
