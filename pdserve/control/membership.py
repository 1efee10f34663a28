"""Membership: which worker incarnations are alive, by lease, and fencing of the dead.

Every worker process has an *incarnation* (a random id it draws at start and again after
being fenced) in its `Register` and `WorkerStats`. The router holds a lease per worker,
renewed by each `WorkerStats`:

- a worker whose messages stop (killed, `kill -STOP`, a lost host) for `lease_s` is dead;
- so is one whose heartbeat still arrives but whose engine loop has not completed a pass
  for `lease_s` plus `STALL_MARGIN` times its longest legitimate pass
  (`WorkerStats.loop_stalled_s`, `loop_pass_max_s`: a deadlock, a step stuck in a KV
  send) — the heartbeat comes from a thread, so its arrival alone proves nothing about the
  loop, and a step that is long by nature (a real model's prefill chunk on a CPU, an
  overloaded host) must not pass for a hang (worker/liveness.py).

A dead incarnation is *fenced*: its requests have moved elsewhere, so whatever it still
says about them is stale. If it comes back (SIGCONT, a healed network) its stats and
registrations are refused and it is told `Fence`: it drops every request without writing
more KV and registers again under a new incarnation, as a new member. A worker that
registers under a known id with a new incarnation (restarted) replaces the old one, whose
requests fail over (`REPLACED`).

NOTE: fencing by lease is time-based, like any lease: the prefill side also refuses to
write KV past its own deadline (worker/handoff.py), and the launcher kills a local worker
whose lease ran out, so a fenced process cannot keep writing into a decode worker's pool.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from pdserve.control.workers import ROLE_CAN, WorkerHandle, WorkerPool
from pdserve.ipc import messages as m

DEFAULT_LEASE_S = 5.0
STALL_MARGIN = 2.0  # x the worker's longest legitimate pass, on top of the lease
FENCE_RESEND_S = 1.0  # tell a fenced incarnation at most this often


class Outcome(enum.Enum):
    NEW = "new"  # first time this router sees the worker id
    REFRESHED = "refreshed"  # the incarnation it knew (a periodic re-announcement)
    REPLACED = "replaced"  # a new incarnation under a known id: the old one is gone
    FENCED = "fenced"  # from an incarnation declared dead: refused, tell it `Fence`
    UNKNOWN = "unknown"  # stats from a worker that has not registered (yet)
    REFUSED = "refused"  # a registration that makes no sense (an unknown role)


@dataclass(frozen=True, slots=True)
class Expiry:
    handle: WorkerHandle
    reason: str


class Membership:
    def __init__(self, pool: WorkerPool, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.pool = pool
        self.lease_s = lease_s
        self._fenced: set[tuple[str, str]] = set()  # (worker id, incarnation)
        self._fence_told: dict[tuple[str, str], float] = {}

    def on_register(self, info: m.Register) -> tuple[Outcome, WorkerHandle | None]:
        """Apply a registration; return what it was and the handle now serving the id
        (None when refused)."""
        if (info.worker_id, info.incarnation) in self._fenced:
            return Outcome.FENCED, None
        if info.role not in ROLE_CAN:
            return Outcome.REFUSED, None
        current = self.pool.workers.get(info.worker_id)
        if current is None:
            return Outcome.NEW, self.pool.connect(info)
        if current.incarnation == info.incarnation and current.info.ctrl_addr == info.ctrl_addr:
            current.info = info  # same process: a re-announcement (or a changed role)
            current.last_seen = time.monotonic()
            return Outcome.REFRESHED, current
        return Outcome.REPLACED, self.pool.connect(info)

    def on_stats(self, stats: m.WorkerStats) -> Outcome:
        """Renew the lease of the incarnation `stats` comes from, if it is the live one."""
        handle = self.pool.workers.get(stats.worker_id)
        if handle is None:
            return Outcome.UNKNOWN
        key = (stats.worker_id, stats.incarnation)
        if key in self._fenced:
            return Outcome.FENCED
        if stats.incarnation and stats.incarnation != handle.incarnation:
            return Outcome.UNKNOWN  # an older process's last words, or a newer one's first
        if not handle.is_alive:
            return Outcome.FENCED
        handle.stats = stats
        handle.last_seen = handle.stats_time = time.monotonic()
        return Outcome.REFRESHED

    def touch(self, worker_id: str) -> None:
        """Any message from a live worker shows its process runs."""
        handle = self.pool.workers.get(worker_id)
        if handle is not None and handle.is_alive:
            handle.last_seen = time.monotonic()

    def find_expired(self) -> list[Expiry]:
        """Live workers whose lease ran out, silent or stalled (module docstring)."""
        now = time.monotonic()
        expired = []
        for handle in self.pool.workers.values():
            if not handle.is_alive:
                continue
            silent = now - handle.last_seen
            stats = handle.stats
            stalled = stats.loop_stalled_s if stats else 0.0
            limit = self.lease_s + STALL_MARGIN * (stats.loop_pass_max_s if stats else 0.0)
            if silent > self.lease_s:
                expired.append(Expiry(handle, f"sent nothing for {silent:.1f} s"))
            elif stalled > limit:
                why = f"engine loop stalled for {stalled:.1f} s (limit {limit:.1f} s)"
                expired.append(Expiry(handle, why))
        return expired

    def fence(self, handle: WorkerHandle) -> None:
        """Declare `handle`'s incarnation dead: no new work, its word no longer counts."""
        handle.is_alive = False
        self._fenced.add((handle.worker_id, handle.incarnation))

    def should_tell_fenced(self, worker_id: str, incarnation: str) -> bool:
        """Whether to send `Fence` to a fenced incarnation that spoke (rate-limited)."""
        key = (worker_id, incarnation)
        now = time.monotonic()
        if now - self._fence_told.get(key, -1e9) < FENCE_RESEND_S:
            return False
        self._fence_told[key] = now
        return True
