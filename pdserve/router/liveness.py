"""`Liveness`: which workers the router still trusts, and what losing one does.

Membership and leases are decided in control/membership.py; this is the router's side of
them, joined to the data path:
- `Register` and `WorkerStats` go through membership: a fenced incarnation is told so
  (`Fence`), a restarted one has its old incarnation's samples moved, and a worker busy
  with requests this router never gave it (the router restarted) is fenced after
  `ORPHAN_GRACE_S`;
- a loop every `LIVENESS_PERIOD_S` fences workers whose lease ran out (and tells the
  launcher, which kills the process so it cannot keep writing KV), and asks unsynced
  workers for their KV snapshot (router/kv_index.py);
- a lost worker (expired, restarted, its process seen dead) leaves the prefix index and
  every attempt on it migrates (router/samples.py).

Kept apart from router/cluster.py so that the rules about losing a worker sit in one
place, whichever of the three ways the loss is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdserve.config import ModelConfig
from pdserve.control.membership import Membership, Outcome
from pdserve.control.workers import WorkerPool
from pdserve.ipc import messages as m
from pdserve.ipc.validate import register_problem
from pdserve.router.kv_index import KVIndex
from pdserve.router.samples import Samples

logger = logging.getLogger(__name__)

SNAPSHOT_RETRY_S = 2.0  # ask an unsynced worker for its KV snapshot at most this often
LIVENESS_PERIOD_S = 0.25
ORPHAN_GRACE_S = 3.0  # a worker busy with nothing of ours this long lost its router


class Liveness:
    def __init__(
        self,
        model_config: ModelConfig,
        pool: WorkerPool,
        membership: Membership,
        kv_index: KVIndex,
        samples: Samples,
        on_expired: Callable[[], Callable[[str], None] | None],
    ) -> None:
        self.model_config = model_config
        self.pool = pool
        self.membership = membership
        self.kv_index = kv_index
        self.samples = samples
        self._on_expired = on_expired  # the client's `on_worker_expired`, read when used
        self._snapshot_asked: dict[str, float] = {}  # worker id -> when

    # ---- what workers say about themselves -------------------------------------------------

    def on_register(self, message: m.Register) -> None:
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
                self.worker_lost(message.worker_id, "restarted", writer_gone=True)

    def on_stats(self, stats: m.WorkerStats) -> None:
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
        if handle.num_assigned or self.samples.attempts_on(stats.worker_id):
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

    # ---- the periodic check ----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_PERIOD_S)
            try:
                self.check()
            except Exception:  # this loop must outlive any bug in one pass
                logger.exception("liveness check failed")

    def check(self) -> None:
        for expiry in self.membership.find_expired():
            worker_id = expiry.handle.worker_id
            self.membership.fence(expiry.handle)
            self.worker_lost(worker_id, expiry.reason, writer_gone=False)
            on_expired = self._on_expired()
            if on_expired is not None:
                on_expired(worker_id)
        for handle in self.pool.workers.values():
            if handle.is_alive and not self.kv_index.is_synced(handle.worker_id):
                self.ask_snapshot(handle.worker_id)  # e.g. this router just started

    def ask_snapshot(self, worker_id: str) -> None:
        """Ask a worker for its KV snapshot (its index entry is unsynced), at most every
        `SNAPSHOT_RETRY_S`: the batches it sent meanwhile are refused too."""
        handle = self.pool.workers.get(worker_id)
        now = time.monotonic()
        if handle is None or now - self._snapshot_asked.get(worker_id, -1e9) < SNAPSHOT_RETRY_S:
            return
        self._snapshot_asked[worker_id] = now
        handle.send(m.SendKVSnapshot())

    # ---- losing a worker -------------------------------------------------------------------

    def mark_dead(self, worker_id: str, reason: str) -> None:
        """The launcher saw the worker's process exit: stop using it now."""
        handle = self.pool.workers.get(worker_id)
        if handle is None:
            return
        was_alive = handle.is_alive
        self.membership.fence(handle)
        if was_alive:
            self.worker_lost(worker_id, reason, writer_gone=True)

    def forget_worker(self, worker_id: str) -> None:
        """A worker removed for good (scale in): out of the pool and the prefix index."""
        handle = self.pool.workers.pop(worker_id, None)
        if handle is not None:
            self.membership.fence(handle)
            handle.close()
        self.kv_index.drop_worker(worker_id)

    def worker_lost(self, worker_id: str, reason: str, writer_gone: bool) -> None:
        logger.error("worker %s %s; moving its requests", worker_id, reason)
        self.kv_index.drop_worker(worker_id)
        for attempt in self.samples.attempts_on(worker_id):
            self.samples.migrate(attempt, f"worker {worker_id} {reason}", worker_id, writer_gone)
