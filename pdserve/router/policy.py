"""Where a request runs: the serving mode and the per-request plan.

Modes:
- `aggregated`: whole requests on mixed workers only.
- `disaggregated`: every request prefilled on a prefill worker, decoded on a decode worker.
- `auto` (conditional disaggregation): a long prompt (at least `auto_local_prefill_tokens`)
  is prefilled remotely, so it does not stall the decode worker's running batch, unless
  every prefill worker is backed up (more than `auto_max_prefill_queue_tokens` prompt
  tokens waiting). A short prompt is prefilled where less prefill work is waiting: on the
  decode worker itself (ties included: no hand-off at all) until its own queue of prompt
  tokens grows past the prefill worker's, then remotely. So an idle prefill pool is never
  left idle while short prompts queue on the decode worker. With no prefill worker alive
  everything stays local.

Within a role the least-loaded worker wins (outstanding tokens, see `router/workers.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.errors import ConfigError
from pdserve.router.workers import WorkerHandle, WorkerPool

MODES = ("aggregated", "disaggregated", "auto")
KV_BACKENDS = ("auto", "shm", "tcp", "nixl")


@dataclass(frozen=True)
class RoutingConfig:
    mode: str = "auto"
    auto_local_prefill_tokens: int = 256
    auto_max_prefill_queue_tokens: int = 8192
    kv_backend: str = "auto"  # auto: shm on one host, else nixl when both have it, else tcp
    kv_transfer_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"{self.mode!r}; choose one of {MODES}")
        if self.kv_backend not in KV_BACKENDS:
            raise ConfigError("kv_backend", f"{self.kv_backend!r}; choose one of {KV_BACKENDS}")
        if self.auto_local_prefill_tokens < 0:
            raise ConfigError("auto_local_prefill_tokens", "must be >= 0")
        if self.kv_transfer_timeout_s <= 2:
            raise ConfigError("kv_transfer_timeout_s", "must be more than 2 seconds")


@dataclass(frozen=True)
class Plan:
    decode: WorkerHandle  # runs the whole request when `prefill` is None
    prefill: WorkerHandle | None = None


def required_jobs(mode: str) -> tuple[str, ...]:
    """What `mode` needs at least one live worker for (readiness)."""
    return {"aggregated": ("mixed",), "disaggregated": ("prefill", "decode")}.get(mode, ("decode",))


def plan_request(pool: WorkerPool, config: RoutingConfig, num_prompt_tokens: int) -> Plan | None:
    """The workers for a new request, or None when the mode's roles have no live worker."""
    if config.mode == "aggregated":
        worker = pool.least_loaded("mixed")
        return Plan(worker) if worker is not None else None
    decode = pool.least_loaded("decode")
    if decode is None:
        return None
    prefill = _least_loaded_other(pool, decode)
    if config.mode == "disaggregated":
        return Plan(decode, prefill) if prefill is not None else None
    if prefill is None:
        return Plan(decode)
    if num_prompt_tokens < config.auto_local_prefill_tokens:
        if decode.pending_prefill_tokens > prefill.pending_prefill_tokens:
            return Plan(decode, prefill)  # the decode worker has more prefill queued
        return Plan(decode)
    if prefill.pending_prefill_tokens > config.auto_max_prefill_queue_tokens:
        return Plan(decode)  # the prefill pool is backed up: do it here
    return Plan(decode, prefill)


def _least_loaded_other(pool: WorkerPool, decode: WorkerHandle) -> WorkerHandle | None:
    candidates = [w for w in pool.alive("prefill") if w is not decode]
    if not candidates:
        return None
    return min(
        candidates, key=lambda w: (w.pending_prefill_tokens, w.outstanding_tokens, w.num_assigned)
    )
