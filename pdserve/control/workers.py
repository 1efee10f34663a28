"""The router's view of its workers: who is registered, in which state, and how loaded.

A `WorkerHandle` is what the data path reads: the worker's registration, its last
`WorkerStats`, its load, and whether it may take new work (`is_alive and not
is_draining`). Who is alive is decided by the control plane (`control/membership.py`:
leases, incarnations, fencing); this module only holds the result.

Load is counted here, on the router, as *outstanding tokens*: prompt tokens still to be
prefilled plus output tokens still to be decoded for every request assigned to the worker.
The router knows these the instant it assigns a request, whereas stats from a worker are
up to a second old. `pending_prefill_tokens` counts the prompt part alone (until the first
token comes back): the queue a new prompt would wait behind. Selection picks the live
worker with the fewest outstanding tokens (ties: fewest running requests, then
registration order). The ledger that charges and releases these is `router/ledger.py`.
"""

from __future__ import annotations

import contextlib
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
    ctrl: zmq.Socket
    last_seen: float = field(default_factory=time.monotonic)
    stats: m.WorkerStats | None = None
    stats_time: float = 0.0  # time.monotonic() when `stats` arrived
    outstanding_tokens: int = 0
    pending_prefill_tokens: int = 0  # prompt tokens assigned whose first token is not back
    num_assigned: int = 0
    is_alive: bool = True
    is_draining: bool = False  # takes no new work (drain, SIGTERM, role switch)
    orphans_since: float | None = None  # busy with requests the router does not know

    @property
    def is_accepting(self) -> bool:
        return self.is_alive and not self.is_draining

    @property
    def incarnation(self) -> str:
        return self.info.incarnation

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
        """Queue a command; never blocks the router (a worker that stopped reading loses
        commands past the socket's queue, and its lease runs out anyway)."""
        with contextlib.suppress(zmq.Again):
            self.ctrl.send(m.encode(message), zmq.NOBLOCK)

    def close(self) -> None:
        if self.ctrl is not None:
            self.ctrl.close(linger=0)

    @property
    def num_waiting_prefill_tokens(self) -> int:
        return self.stats.num_waiting_prefill_tokens if self.stats else 0


class WorkerPool:
    """The registered workers by id. Membership (`control/membership.py`) adds, replaces
    and marks them; dispatch asks `alive(job)`."""

    def __init__(self, ctx: zmq.asyncio.Context | None) -> None:
        self.ctx = ctx
        self.workers: dict[str, WorkerHandle] = {}

    def connect(self, info: m.Register) -> WorkerHandle:
        """A handle with a command socket to the worker `info` describes, replacing (and
        closing) any handle under the same id."""
        old = self.workers.pop(info.worker_id, None)
        if old is not None:
            old.close()
        # A plain (not asyncio) socket: sends are NOBLOCK and never wait for a peer.
        ctrl = self.ctx.socket(zmq.PUSH, socket_class=zmq.Socket)
        ctrl.setsockopt(zmq.LINGER, 0)
        ctrl.connect(info.ctrl_addr)
        handle = WorkerHandle(info, ctrl)
        self.workers[info.worker_id] = handle
        return handle

    def alive(self, job: str) -> list[WorkerHandle]:
        """Workers that may take new work of `job` (alive and not draining)."""
        return [w for w in self.workers.values() if w.is_accepting and w.can(job)]

    def least_loaded(self, job: str) -> WorkerHandle | None:
        candidates = self.alive(job)
        if not candidates:
            return None
        return min(candidates, key=lambda w: (w.outstanding_tokens, w.num_assigned))

    def close(self) -> None:
        for handle in self.workers.values():
            handle.close()
        self.workers.clear()
