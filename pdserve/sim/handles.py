"""The router's view of simulated workers: what `router/policy.py` and
`router/selection.py` read from a `WorkerHandle`, and nothing else.

`plan_request(pool, ...)` calls `pool.alive(job)`; the selectors read `worker_id`,
`num_assigned`, `pending_prefill_tokens`, `outstanding_tokens` and `stats.num_free_blocks`
/ `stats.num_blocks`. `SimHandle` has exactly those (duck-typed: the real `WorkerHandle`
carries a ZeroMQ socket), and the router simulation (sim/cluster.py) keeps the load
counters the way `router/cluster.py` does: charged when a request is assigned, the
prefill part released at the first token, the rest when the request is done there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.control.workers import ROLE_CAN


@dataclass(slots=True)
class SimStats:
    num_free_blocks: int
    num_blocks: int


@dataclass(eq=False)
class SimHandle:
    worker_id: str
    role: str
    block_size: int
    stats: SimStats
    outstanding_tokens: int = 0
    pending_prefill_tokens: int = 0
    num_assigned: int = 0
    is_alive: bool = True

    def can(self, job: str) -> bool:
        return job in ROLE_CAN[self.role]


@dataclass
class SimPool:
    workers: dict[str, SimHandle] = field(default_factory=dict)

    def add(self, handle: SimHandle) -> None:
        self.workers[handle.worker_id] = handle

    def alive(self, job: str) -> list[SimHandle]:
        return [w for w in self.workers.values() if w.is_alive and w.can(job)]
