"""The router's view of its workers: who is registered, alive, and how loaded.

Workers announce themselves (`Register`) on the router's socket and then send
`WorkerStats` at least once a second (from a heartbeat thread, so a long prefill step
does not look like a death). A worker silent for `liveness_timeout_s` is dead: it gets no
new requests and the requests it holds fail.

Load is counted here, on the router, as *outstanding tokens*: prompt tokens still to be
prefilled plus output tokens still to be decoded for every request assigned to the worker.
The router knows these the instant it assigns a request, whereas stats from a worker are
up to a second old. `pending_prefill_tokens` counts the prompt part alone (until the first
token comes back): the queue a new prompt would wait behind. Selection picks the live
worker with the fewest outstanding tokens (ties: fewest running requests, then
registration order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from pdserve.ipc import messages as m

ROLE_CAN = {
    "prefill": {"prefill"},
    "decode": {"decode"},
    "mixed": {"prefill", "decode", "mixed"},
}


@dataclass(eq=False)
class WorkerHandle:
    info: m.Register
    ctrl: zmq.asyncio.Socket
    last_seen: float = field(default_factory=time.monotonic)
    stats: m.WorkerStats | None = None
    stats_time: float = 0.0  # time.monotonic() when `stats` arrived
    outstanding_tokens: int = 0
    pending_prefill_tokens: int = 0  # prompt tokens assigned whose first token is not back
    num_assigned: int = 0
    is_alive: bool = True

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.info.role

    def can(self, job: str) -> bool:
        """job: "prefill" (remote prefill), "decode" (import KV, or prefill locally and
        decode), "mixed" (whole requests)."""
        return job in ROLE_CAN[self.role]

    def send(self, message: m.Message) -> None:
        self.ctrl.send(m.encode(message))

    @property
    def num_waiting_prefill_tokens(self) -> int:
        return self.stats.num_waiting_prefill_tokens if self.stats else 0


class WorkerPool:
    def __init__(self, ctx: zmq.asyncio.Context, liveness_timeout_s: float = 10.0) -> None:
        self.ctx = ctx
        self.liveness_timeout_s = liveness_timeout_s
        self.workers: dict[str, WorkerHandle] = {}

    def register(self, info: m.Register) -> WorkerHandle:
        """Add a worker, or replace one that restarted under the same id. A worker
        re-announces itself periodically (so a restarted router learns of it); the same
        announcement again only refreshes it."""
        current = self.workers.get(info.worker_id)
        if current is not None and current.info == info:
            current.last_seen = time.monotonic()
            current.is_alive = True
            return current
        old = self.workers.pop(info.worker_id, None)
        if old is not None:
            old.ctrl.close(linger=0)
        ctrl = self.ctx.socket(zmq.PUSH)
        ctrl.setsockopt(zmq.LINGER, 0)
        ctrl.connect(info.ctrl_addr)
        handle = WorkerHandle(info, ctrl)
        self.workers[info.worker_id] = handle
        return handle

    def on_stats(self, stats: m.WorkerStats) -> None:
        handle = self.workers.get(stats.worker_id)
        if handle is not None:
            handle.stats = stats
            handle.last_seen = handle.stats_time = time.monotonic()
            handle.is_alive = True

    def touch(self, worker_id: str) -> None:
        handle = self.workers.get(worker_id)
        if handle is not None:
            handle.last_seen = time.monotonic()

    def find_dead(self) -> list[WorkerHandle]:
        """Mark and return workers that went silent since the last call."""
        now = time.monotonic()
        dead = []
        for handle in self.workers.values():
            if handle.is_alive and now - handle.last_seen > self.liveness_timeout_s:
                handle.is_alive = False
                dead.append(handle)
        return dead

    def alive(self, job: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.is_alive and w.can(job)]

    def least_loaded(self, job: str) -> WorkerHandle | None:
        candidates = self.alive(job)
        if not candidates:
            return None
        return min(candidates, key=lambda w: (w.outstanding_tokens, w.num_assigned))

    def close(self) -> None:
        for handle in self.workers.values():
            handle.ctrl.close(linger=0)
        self.workers.clear()
