"""The load ledger: what each dispatch attempt charged to which worker, and its release.

Routing decisions read a worker's load the instant a request is assigned
(`WorkerHandle.outstanding_tokens`, `num_assigned`, `pending_prefill_tokens`; see
control/workers.py), so the router counts it itself rather than wait for stats. Every
charge is recorded on the attempt that made it (`Charges`), so that whatever ends the
attempt — a finish, an abort, a worker's death, a migration — releases exactly what was
charged, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.control.workers import WorkerHandle, WorkerPool


@dataclass(eq=False)
class Charges:
    """One attempt's charges: tokens per worker, and the prompt tokens a worker is
    computing until the attempt's first token comes back."""

    num_prompt_tokens: int
    loads: dict[str, int] = field(default_factory=dict)  # worker id -> tokens charged
    prefilling: tuple[str, int] | None = None  # (worker id, prompt tokens) until 1st token

    @property
    def worker_ids(self) -> list[str]:
        return list(self.loads)


class LoadLedger:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def charge(self, charges: Charges, worker: WorkerHandle, tokens: int) -> None:
        charges.loads[worker.worker_id] = charges.loads.get(worker.worker_id, 0) + tokens
        worker.outstanding_tokens += tokens
        worker.num_assigned += 1

    def charge_prefill(self, charges: Charges, worker: WorkerHandle, num_cached: int) -> None:
        """Count the prompt tokens `worker` will compute (those past its cached prefix)
        until the first token comes back."""
        tokens = max(0, charges.num_prompt_tokens - num_cached)
        charges.prefilling = (worker.worker_id, tokens)
        worker.pending_prefill_tokens += tokens

    def prefill_done(self, charges: Charges) -> None:
        if charges.prefilling is None:
            return
        worker_id, tokens = charges.prefilling
        charges.prefilling = None
        handle = self.pool.workers.get(worker_id)
        if handle is not None:
            handle.pending_prefill_tokens -= tokens

    def release(self, charges: Charges, worker_id: str) -> None:
        """Everything `charges` holds on one worker."""
        if charges.prefilling is not None and charges.prefilling[0] == worker_id:
            self.prefill_done(charges)
        tokens = charges.loads.pop(worker_id, None)
        handle = self.pool.workers.get(worker_id)
        if handle is not None and tokens is not None:
            handle.outstanding_tokens -= tokens
            handle.num_assigned -= 1

    def release_all(self, charges: Charges) -> None:
        for worker_id in list(charges.loads):
            self.release(charges, worker_id)
