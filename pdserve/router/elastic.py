"""Changing the cluster's shape at runtime: role switches and scale in/out.

- `switch_role(worker, role)`: drain the worker — it takes no new work, its running
  requests finish where they are for up to `drain_timeout_s` and only what is left then
  migrates (control/migration.py): a migrated request is prefilled again elsewhere, on
  the same cores, so moving it costs more than letting it finish (measured: a switch
  that moved everything at once cost 90 recomputed requests in one run) — then tell it
  `SetRole`, wait until it registers again in the new role (same process, same
  incarnation: its weights, KV pool, blocks and prefix cache stay, and so does its entry
  in the global prefix index), then let it take work again. The launcher restarts it in
  the new role if it ever dies. `drain_timeout_s=0` migrates everything at once.
- `scale_out(role)`: the launcher starts one more worker; returns once it serves.
- `scale_in(worker)`: drain, `Shutdown`, the launcher stops it for good; its entry leaves
  the router.

These are the mechanisms; who decides (an operator through `/admin`, or a planner) is
another matter. Every switch is counted in `pdserve:role_switches_total{from,to,reason}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pdserve.control.workers import ROLE_CAN
from pdserve.errors import ConfigError, PdserveError, ServiceUnavailableError
from pdserve.ipc import messages as m
from pdserve.router.drain import UnknownWorkerError

if TYPE_CHECKING:
    from pdserve.control.launcher import Launcher
    from pdserve.control.workers import WorkerPool
    from pdserve.router.drain import DrainReport, Drains
    from pdserve.router.metrics import RouterMetrics

logger = logging.getLogger(__name__)

ROLES = tuple(ROLE_CAN)
SWITCH_TIMEOUT_S = 30.0  # for the worker to answer SetRole
DRAIN_TIMEOUT_S = 10.0  # running requests finish this long before the rest migrate
START_TIMEOUT_S = 300.0  # for a new worker to load and register


@dataclass(frozen=True, slots=True)
class RoleSwitch:
    worker_id: str
    old_role: str
    new_role: str
    num_migrated: int
    seconds: float  # drain + switch
    switch_seconds: float  # SetRole sent -> registered in the new role
    num_finished: int = 0  # requests that finished on the worker during the drain


class ElasticHost(Protocol):
    """What role switches and scaling need of the router (`ClusterClient`)."""

    pool: WorkerPool
    drains: Drains
    launcher: Launcher | None
    metrics: RouterMetrics | None
    min_workers: int

    async def drain(
        self, worker_id: str, migrate: bool = True, timeout_s: float = 60.0
    ) -> DrainReport: ...

    def forget_worker(self, worker_id: str) -> None: ...


class Elastic:
    def __init__(self, client: ElasticHost) -> None:
        self.client = client
        self._locks: dict[str, asyncio.Lock] = {}
        self.history: deque[tuple[float, RoleSwitch, str]] = deque(maxlen=50)  # (when, what, why)
        self.drain_timeout_s = DRAIN_TIMEOUT_S  # serve setting `role_switch_drain_s`

    async def switch_role(
        self, worker_id: str, role: str, reason: str = "admin", drain_timeout_s: float | None = None
    ) -> RoleSwitch:
        """Drain (finish, then migrate what is left after `drain_timeout_s`, default
        `self.drain_timeout_s`), switch, serve again (module docstring)."""
        if role not in ROLES:
            raise ConfigError("role", f"{role!r}; choose one of {ROLES}")
        timeout_s = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        async with self._locks.setdefault(worker_id, asyncio.Lock()):
            handle = self._handle(worker_id)
            old = handle.role
            start = time.monotonic()
            if old == role:
                return RoleSwitch(worker_id, old, role, 0, 0.0, 0.0)
            report = await self.client.drain(
                worker_id, migrate=timeout_s <= 0, timeout_s=max(0.0, timeout_s)
            )
            switch_start = time.monotonic()
            handle.send(m.SetRole(role))
            try:
                await self._until(lambda: self._handle(worker_id).role == role, SWITCH_TIMEOUT_S)
            finally:
                self.client.drains.resume(worker_id)
            if self.client.launcher is not None:
                self.client.launcher.set_role(worker_id, role)
            if self.client.metrics is not None:
                self.client.metrics.observe_role_switch(old, role, reason)
            now = time.monotonic()
            switch = RoleSwitch(
                worker_id,
                old,
                role,
                report.num_migrated,
                now - start,
                now - switch_start,
                report.num_finished,
            )
            self.history.append((now, switch, reason))
            logger.info(
                "worker %s: %s -> %s (%s) in %.2f s: %d finished, %d moved",
                worker_id,
                old,
                role,
                reason,
                switch.seconds,
                switch.num_finished,
                switch.num_migrated,
            )
            return switch

    async def scale_out(self, role: str) -> str:
        if role not in ROLES:
            raise ConfigError("role", f"{role!r}; choose one of {ROLES}")
        launcher = self._launcher()
        worker_id = launcher.add(role)
        logger.info("scaling out: worker %s (%s) starting", worker_id, role)

        def serving() -> bool:
            handle = self.client.pool.workers.get(worker_id)
            return handle is not None and handle.is_accepting

        await self._until(serving, START_TIMEOUT_S)
        # Counted once it serves: a worker still waiting for a node (launcher `pending`)
        # must not turn /ready off for the ones that serve.
        self.client.min_workers += 1
        return worker_id

    async def scale_in(self, worker_id: str) -> None:
        launcher = self._launcher()
        self._handle(worker_id)
        await self.client.drain(worker_id, migrate=True)
        self._handle(worker_id).send(m.Shutdown())
        await asyncio.get_running_loop().run_in_executor(None, launcher.remove, worker_id)
        self.client.forget_worker(worker_id)
        self.client.min_workers = max(0, self.client.min_workers - 1)
        logger.info("scaled in: worker %s removed", worker_id)

    def _handle(self, worker_id: str):
        handle = self.client.pool.workers.get(worker_id)
        if handle is None:
            raise UnknownWorkerError(worker_id)
        return handle

    def _launcher(self):
        if self.client.launcher is None:
            raise PdserveError(
                "this router launches no workers (pdserve router): scale them yourself"
            )
        return self.client.launcher

    @staticmethod
    async def _until(condition, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(f"the worker did not answer within {timeout_s:g} s")
            await asyncio.sleep(0.02)
