"""Launchers: how `pdserve serve` starts, watches, restarts and stops its workers.

`Launcher` is the interface the rest of the control plane uses (the watchdog here, scale
in/out and role switches in router/elastic.py): `start`, `exited` (who died, and how),
`restart`, `kill`, `add`, `remove`, `set_role`, `stop`, `pending`. `LocalLauncher` runs
each worker as a child process of this one; `RayLauncher` (control/ray_launcher.py) as a
Ray actor that owns the process.

Restarts back off exponentially (`RestartPolicy`: 0.5 s, 1 s, 2 s, ... up to 30 s; the
count resets once a worker has stayed up for a minute), so a crash loop cannot spin, and
there is no lifetime cap: a worker that keeps failing keeps being retried, slowly, and
`/ready` recovers the moment it stays up. The shared-memory KV pool of a dead worker is
removed before its successor starts.

`watch` is the watchdog: it marks an exited worker dead at once (its requests migrate
instead of waiting for the lease) and schedules its restart. It survives its own errors.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("pdserve.launcher")

WATCH_PERIOD_S = 0.2


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0  # up this long: the next failure starts from the start

    def backoff(self, num_recent_failures: int) -> float:
        """Seconds to wait before restart number `num_recent_failures` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** (num_recent_failures - 1))


@dataclass
class _Restarts:
    num_recent: int = 0  # failures since the worker last stayed up `stable_after_s`
    num_total: int = 0
    due: float | None = None  # time.monotonic() of the scheduled restart


class Launcher(abc.ABC):
    """Starts and stops workers somewhere (local processes, Ray actors, ...)."""

    @abc.abstractmethod
    def start(self, counts: dict[str, int]) -> None:
        """Start `counts[role]` workers of each role."""

    @abc.abstractmethod
    def exited(self) -> list[tuple[str, str]]:
        """Workers that died since the last call: (worker id, how)."""

    @abc.abstractmethod
    def restart(self, worker_id: str) -> None:
        """Start a dead worker again, under the same id and role."""

    @abc.abstractmethod
    def kill(self, worker_id: str) -> None:
        """Kill a worker now (fencing: it was declared dead while its process lives)."""

    @abc.abstractmethod
    def add(self, role: str) -> str:
        """Start one more worker of `role` (scale out); returns its id."""

    @abc.abstractmethod
    def remove(self, worker_id: str) -> None:
        """Stop a worker for good (scale in, after a drain): it is not restarted."""

    @abc.abstractmethod
    def set_role(self, worker_id: str, role: str) -> None:
        """The worker now serves `role` (a runtime switch): restart it in that role."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop every worker."""

    def pending(self) -> dict[str, str]:
        """Workers started but not yet placed anywhere (no Ray node has room): id -> role."""
        return {}


class LocalLauncher(Launcher):
    """Workers as child processes of this one, with a command line built by `command`."""

    def __init__(
        self,
        command: Callable[[str, str], list[str]],
        env: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        self._command = command  # (role, worker id) -> argv
        self._env = env or (lambda role: dict(os.environ))
        self.procs: dict[str, subprocess.Popen] = {}
        self.roles: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self._reported: set[int] = set()  # pids whose exit `exited` returned

    def start(self, counts: dict[str, int]) -> None:
        for role, count in counts.items():
            for i in range(count):
                self.spawn(role, f"{role}-{i}")

    def spawn(self, role: str, worker_id: str) -> None:
        self.roles[worker_id] = role
        self.started[worker_id] = time.monotonic()
        self.procs[worker_id] = subprocess.Popen(
            self._command(role, worker_id), env=self._env(role), preexec_fn=_die_with_parent
        )

    def exited(self) -> list[tuple[str, str]]:
        dead = []
        for worker_id, proc in self.procs.items():
            if proc.poll() is not None and proc.pid not in self._reported:
                self._reported.add(proc.pid)
                dead.append((worker_id, f"exited with code {proc.returncode}"))
        return dead

    def failed(self) -> str | None:
        """A worker whose process has exited, if any (start-up checks)."""
        return next((w for w, p in self.procs.items() if p.poll() is not None), None)

    def add(self, role: str) -> str:
        worker_id = next_worker_id(role, set(self.roles))
        self.spawn(role, worker_id)
        return worker_id

    def remove(self, worker_id: str, timeout_s: float = 10.0) -> None:
        proc = self.procs.pop(worker_id, None)
        self.roles.pop(worker_id, None)
        if proc is None:
            return
        self._reported.add(proc.pid)  # an exit the watchdog must not restart
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        remove_shm_pools([proc.pid])

    def set_role(self, worker_id: str, role: str) -> None:
        if worker_id in self.roles:
            self.roles[worker_id] = role

    def restart(self, worker_id: str) -> None:
        if worker_id not in self.procs:
            return  # removed (scale in) after it was scheduled
        old = self.procs.pop(worker_id)
        if old.poll() is None:
            old.kill()
            old.wait()
        remove_shm_pools([old.pid])
        self.spawn(self.roles[worker_id], worker_id)

    def kill(self, worker_id: str) -> None:
        proc = self.procs.get(worker_id)
        if proc is not None and proc.poll() is None:
            logger.warning("killing worker %s (pid %d): declared dead", worker_id, proc.pid)
            proc.kill()

    def stop(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        remove_shm_pools([p.pid for p in self.procs.values()])


@dataclass
class Watchdog:
    """Marks dead workers dead and restarts them with backoff (module docstring)."""

    launcher: LocalLauncher
    mark_dead: Callable[[str, str], None]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    restarts: dict[str, _Restarts] = field(default_factory=dict)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            try:
                self.check()
            except Exception:  # the watchdog must not die of one bad pass
                logger.exception("watchdog pass failed")

    def check(self) -> None:
        now = time.monotonic()
        for worker_id, how in self.launcher.exited():
            self.mark_dead(worker_id, how)
            self._schedule(worker_id, now)
        for worker_id, state in self.restarts.items():
            if state.due is not None and now >= state.due:
                state.due = None
                logger.warning("restarting worker %s (restart %d)", worker_id, state.num_total)
                self.launcher.restart(worker_id)

    def _schedule(self, worker_id: str, now: float) -> None:
        state = self.restarts.setdefault(worker_id, _Restarts())
        if now - self.launcher.started.get(worker_id, now) > self.policy.stable_after_s:
            state.num_recent = 0
        state.num_recent += 1
        state.num_total += 1
        delay = self.policy.backoff(state.num_recent)
        state.due = now + delay
        logger.error("worker %s died; restarting in %.1f s", worker_id, delay)


def next_worker_id(role: str, taken: set[str]) -> str:
    """The first `<role>-<i>` not in `taken` (scale out reuses a removed worker's id)."""
    return next(f"{role}-{i}" for i in range(len(taken) + 1) if f"{role}-{i}" not in taken)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def remove_shm_pools(pids: list[int]) -> None:
    from pdserve.transfer import SHM_DIR, SHM_PREFIX

    for pid in pids:
        for path in SHM_DIR.glob(f"{SHM_PREFIX}*-{pid}"):
            path.unlink(missing_ok=True)


def python_module_command(*args: str) -> list[str]:
    """`python -m pdserve.cli ...` with this interpreter."""
    return [sys.executable, "-m", "pdserve.cli", *args]
