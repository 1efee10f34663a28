"""Draining a worker: stop giving it work, move or finish what it holds, report when empty.

`drain(worker_id, migrate=True)` marks the worker draining (routing no longer picks it;
`WorkerPool.alive` skips it), then either migrates every request it holds at once
(`migrate=True`: fastest; the requests resume elsewhere from the tokens already streamed,
control/migration.py) or lets them finish and migrates what is left after `timeout_s`.
It returns once the router has nothing placed on the worker. This is what role switching
and scale-in build on, and what a worker's SIGTERM triggers (`Draining` message): the
router drains it and then sends `Shutdown`.

`resume(worker_id)` undoes a drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pdserve.errors import PdserveError
from pdserve.ipc import messages as m

if TYPE_CHECKING:
    from pdserve.control.workers import WorkerPool
    from pdserve.router.dispatch import Attempt

logger = logging.getLogger(__name__)

POLL_S = 0.02


class UnknownWorkerError(PdserveError, KeyError):
    """No worker with that id is registered."""


@dataclass(frozen=True, slots=True)
class DrainReport:
    worker_id: str
    num_migrated: int  # requests moved to other workers
    num_finished: int  # requests that finished on the worker while it drained
    seconds: float


class DrainHost(Protocol):
    """What a drain needs of the router (`ClusterClient`): its workers and the attempts
    placed on them, and moving those elsewhere."""

    pool: WorkerPool

    def attempts_on(self, worker_id: str) -> list[Attempt]: ...

    def move_off(self, worker_id: str, reason: str) -> int: ...


class Drains:
    def __init__(self, client: DrainHost) -> None:
        self.client = client
        self._tasks: set[asyncio.Task] = set()

    async def drain(self, worker_id: str, migrate: bool, timeout_s: float) -> DrainReport:
        handle = self.client.pool.workers.get(worker_id)
        if handle is None:
            raise UnknownWorkerError(worker_id)
        start = time.monotonic()
        handle.is_draining = True
        held = {a.request_id for a in self.client.attempts_on(worker_id)}
        num_migrated = 0
        if not migrate:
            deadline = start + timeout_s
            while self.client.attempts_on(worker_id) and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
        remaining = self.client.attempts_on(worker_id)
        num_migrated = self.client.move_off(worker_id, f"worker {worker_id} is draining")
        while self.client.attempts_on(worker_id):  # moves whose reservation was pending
            await asyncio.sleep(POLL_S)
        num_finished = len(held) - len({a.request_id for a in remaining} & held)
        report = DrainReport(worker_id, num_migrated, num_finished, time.monotonic() - start)
        logger.info(
            "worker %s drained: %d moved, %d finished, %.2f s",
            worker_id,
            report.num_migrated,
            report.num_finished,
            report.seconds,
        )
        return report

    def resume(self, worker_id: str) -> None:
        handle = self.client.pool.workers.get(worker_id)
        if handle is None:
            raise UnknownWorkerError(worker_id)
        handle.is_draining = False

    def on_worker_draining(self, worker_id: str) -> None:
        """The worker got SIGTERM: drain it, then tell it to exit."""
        handle = self.client.pool.workers.get(worker_id)
        if handle is None or handle.is_draining:
            return
        task = asyncio.get_running_loop().create_task(self._drain_and_stop(worker_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_and_stop(self, worker_id: str) -> None:
        try:
            await self.drain(worker_id, migrate=True, timeout_s=0.0)
        except Exception:
            logger.exception("draining worker %s failed", worker_id)
        handle = self.client.pool.workers.get(worker_id)
        if handle is not None:
            handle.send(m.Shutdown())
