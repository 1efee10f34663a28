"""Where a request runs: the serving mode and the per-request plan.

Modes:
- `aggregated`: whole requests on mixed workers only.
- `disaggregated`: every request prefilled on a prefill worker, decoded on a decode worker.
- `auto` (conditional disaggregation): a long prompt (at least `auto_local_prefill_tokens`)
  is prefilled remotely, so it does not stall the decode worker's running batch, unless
  every prefill worker is backed up (more than `auto_max_prefill_queue_tokens` prompt
  tokens waiting). A short prompt goes where it adds the least waiting, summed over the
  requests it delays, counted in prompt tokens to compute: on the decode worker it waits
  for that worker's queued prompt tokens, and then every request decoding there waits for
  it (its step grows by the prompt); on the prefill worker it waits for that queue alone.
  So it stays local — no hand-off at all — iff `decode queued + decode requests x prompt
  <= prefill queued`: always on an idle decode worker, on a busy one only when the prefill
  worker is backed up by that much. (The first version kept short prompts local on ties,
  the second whenever the prefill queue exceeded the decode worker's queue plus the
  prompt; both stalled running batches for a few queued prompts, and on the `code`
  workload auto trailed `disaggregated`, docs/benchmarks.md.) With no prefill worker alive
  everything stays local.

  In `auto` mode only workers in the `prefill` role take prompts for others: a mixed
  worker is a whole-request worker, and is the decode target like a decode worker. (Mixed
  workers used to be each other's prefill workers, so two of them handed long prompts, and
  short ones whenever the decode pick was busy, back and forth — not the aggregated
  layout the planner rated them as; docs/benchmarks.md, elastic run D.) `disaggregated`
  still uses a mixed worker as the prefill worker when no prefill worker is alive.

Prompt length in `auto` means the tokens the decode worker would really compute: the
prompt minus its cached prefix (global prefix index), so a long prompt whose prefix the
decode worker already holds is finished locally, with no hand-over at all.

Within a pool, the routing policy picks the worker (`router/selection.py`: `kv_aware` by
default, `least_loaded`, `round_robin`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.control.workers import WorkerHandle, WorkerPool
from pdserve.errors import ConfigError
from pdserve.router.selection import SELECTORS, CachedTokens, KVAwareWeights, Selector

MODES = ("aggregated", "disaggregated", "auto")
KV_BACKENDS = ("auto", "shm", "tcp", "nixl")
KV_WIRE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class RoutingConfig:
    mode: str = "auto"
    auto_local_prefill_tokens: int = 256
    auto_max_prefill_queue_tokens: int = 8192
    kv_backend: str = "auto"  # auto: shm on one host, else nixl when both have it, else tcp
    kv_transfer_timeout_s: float = 60.0
    # int8: tcp transfers carry int8 KV with per-block, per-head scales (0.5x the bytes of
    # bfloat16, lossy; see kv/int8.py); auto: the pool's dtype. shm/nixl stay full precision.
    kv_wire_dtype: str = "auto"
    # Which worker of a pool (router/selection.py) and, for kv_aware, its cost weights
    # (tokens per unit) and load margin (tokens).
    routing_policy: str = "kv_aware"
    kv_aware_prefill_weight: float = 1.0  # per uncached prompt token
    kv_aware_queue_weight: float = 1.0  # per prompt token queued on the worker
    kv_aware_running_weight: float = 16.0  # per request assigned to the worker
    kv_aware_usage_weight: float = 512.0  # for a full KV pool
    kv_aware_load_margin: float = 4096.0  # past the least-loaded: a prefix hit no longer counts

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"{self.mode!r}; choose one of {MODES}")
        if self.routing_policy not in SELECTORS:
            raise ConfigError(
                "routing_policy", f"{self.routing_policy!r}; choose one of {sorted(SELECTORS)}"
            )
        for name in (
            "kv_aware_prefill_weight",
            "kv_aware_queue_weight",
            "kv_aware_running_weight",
            "kv_aware_usage_weight",
            "kv_aware_load_margin",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        if self.kv_backend not in KV_BACKENDS:
            raise ConfigError("kv_backend", f"{self.kv_backend!r}; choose one of {KV_BACKENDS}")
        if self.kv_wire_dtype not in KV_WIRE_DTYPES:
            raise ConfigError(
                "kv_wire_dtype", f"{self.kv_wire_dtype!r}; choose one of {KV_WIRE_DTYPES}"
            )
        if self.auto_local_prefill_tokens < 0:
            raise ConfigError("auto_local_prefill_tokens", "must be >= 0")
        if self.kv_transfer_timeout_s <= 2:
            raise ConfigError("kv_transfer_timeout_s", "must be more than 2 seconds")

    def weights(self) -> KVAwareWeights:
        return KVAwareWeights(
            self.kv_aware_prefill_weight,
            self.kv_aware_queue_weight,
            self.kv_aware_running_weight,
            self.kv_aware_usage_weight,
            self.kv_aware_load_margin,
        )

    def selector(self) -> Selector:
        return SELECTORS[self.routing_policy](self.weights())


@dataclass(frozen=True)
class Plan:
    decode: WorkerHandle  # runs the whole request when `prefill` is None
    prefill: WorkerHandle | None = None
    # Why: (job, reason) per worker picked (router/selection.py), and where the prompt is
    # prefilled ("local" | "remote", reason) in auto and disaggregated modes.
    picks: tuple[tuple[str, str], ...] = ()
    placement: tuple[str, str] | None = None


def required_jobs(mode: str) -> tuple[str, ...]:
    """What `mode` needs at least one live worker for (readiness)."""
    return {"aggregated": ("mixed",), "disaggregated": ("prefill", "decode")}.get(mode, ("decode",))


def plan_request(
    pool: WorkerPool,
    config: RoutingConfig,
    num_prompt_tokens: int,
    cached: CachedTokens | None = None,
    selector: Selector | None = None,
    avoid: frozenset[str] = frozenset(),
) -> Plan | None:
    """The workers for a new request, or None when the mode's roles have no live worker.
    `cached(worker)`: prompt tokens that worker holds (prefix index; default none);
    `selector`: the routing policy's state (round-robin turns), else made from `config`;
    `avoid`: worker ids to pass over while another worker of the role is alive (a
    request moving off a worker that failed it)."""
    cached = cached or (lambda worker: 0)
    selector = selector or config.selector()
    pool = _Avoiding(pool, avoid) if avoid else pool

    def pick(job: str, candidates: list[WorkerHandle]) -> WorkerHandle | None:
        if not candidates:
            return None
        choice = selector.pick(candidates, job, num_prompt_tokens, cached)
        picks.append((job, choice.reason))
        return choice.worker

    picks: list[tuple[str, str]] = []
    if config.mode == "aggregated":
        worker = pick("mixed", pool.alive("mixed"))
        return Plan(worker, picks=tuple(picks)) if worker is not None else None
    decode = pick("decode", pool.alive("decode"))
    if decode is None:
        return None
    prefill = pick(
        "prefill", [w for w in _prefill_candidates(pool, config.mode) if w is not decode]
    )
    if prefill is None and config.mode == "disaggregated":
        # The decode pick took the only worker that can prefill (a mixed one): pick the
        # prefill worker first, then decode among the others.
        picks.clear()
        prefill = pick("prefill", pool.alive("prefill"))
        if prefill is None:
            return None
        decode = pick("decode", [w for w in pool.alive("decode") if w is not prefill])
        if decode is None:
            return None

    def plan(placement: str, reason: str) -> Plan:
        remote = prefill if placement == "remote" else None
        used = tuple(p for p in picks if remote is not None or p[0] != "prefill")
        return Plan(decode, remote, used, (placement, reason))

    if config.mode == "disaggregated":
        return plan("remote", "mode") if prefill is not None else None
    if prefill is None:
        return plan("local", "no_prefill_worker")
    num_uncached = num_prompt_tokens - cached(decode)  # what the decode worker would compute
    if num_uncached < config.auto_local_prefill_tokens:
        if decode.num_assigned == 0:
            return plan("local", "decode_idle")  # nothing running there to stall
        # Waiting added, in prompt tokens, summed over the requests that wait (module doc).
        local = decode.pending_prefill_tokens + decode.num_assigned * num_uncached
        if local <= prefill.pending_prefill_tokens:
            return plan("local", "prefill_queue")  # the prefill worker is that backed up
        return plan("remote", "decode_busy")
    if prefill.pending_prefill_tokens > config.auto_max_prefill_queue_tokens:
        return plan("local", "prefill_backed_up")  # the prefill pool is backed up: do it here
    return plan("remote", "long_uncached")


def _prefill_candidates(pool: WorkerPool | _Avoiding, mode: str) -> list[WorkerHandle]:
    """Who may prefill for another worker: in `auto`, the prefill role only (module doc)."""
    workers = pool.alive("prefill")
    return [w for w in workers if w.role == "prefill"] if mode == "auto" else workers


class _Avoiding:
    """`pool`, with `avoid` left out of each role's live workers unless nothing else is."""

    def __init__(self, pool: WorkerPool, avoid: frozenset[str]) -> None:
        self._pool = pool
        self._avoid = avoid

    def alive(self, job: str) -> list[WorkerHandle]:
        workers = self._pool.alive(job)
        return [w for w in workers if w.worker_id not in self._avoid] or workers
