"""Which worker of a pool gets a request: the routing policies.

A policy (`Selector`) picks one of the live candidates for a job ("mixed" whole requests,
"decode", "prefill") and says why (the `reason` label of
`pdserve:routing_decisions_total`). Registered by name in `SELECTORS`:

- `kv_aware` (default): each candidate's cost is the prefill work it would still do plus
  its load, both in tokens:

      cost = prefill_weight * uncached prompt tokens
           + queue_weight * prompt tokens queued on it (assigned, first token not back)
           + running_weight * requests assigned to it
           + usage_weight * fraction of its KV pool in use

  Uncached tokens come from the global prefix index (router/kv_index.py): the prompt
  minus the leading blocks the worker holds in any tier. Candidates whose load exceeds
  the least-loaded one's by more than `load_margin` tokens are not considered, however
  much of the prompt they hold: a hot prefix must not pile every request on one worker.
  So a request whose prefix is cached on worker B goes to B unless B's load is over the
  margin (or B's extra load outweighs the tokens it saves).
- `least_loaded`: fewest outstanding tokens (prefill: fewest queued prompt tokens first).
- `round_robin`: each candidate in turn (a baseline for benchmarks).

Reasons: `prefix_hit` (the pick holds the longest cached prefix, and some), `load` (no
candidate holds any of the prompt: chosen by load), `load_over_prefix` (a candidate
holding more of the prompt was over the margin, or its load outweighed its hit),
`least_loaded`, `round_robin`.

No torch here, nor sockets: tests drive these with plain `WorkerHandle`s.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.control.workers import WorkerHandle

# Prompt tokens a worker holds cached (0 when unknown).
CachedTokens = Callable[[WorkerHandle], int]


@dataclass(frozen=True)
class KVAwareWeights:
    prefill_weight: float = 1.0
    queue_weight: float = 1.0
    running_weight: float = 16.0
    usage_weight: float = 512.0
    load_margin: float = 4096.0


@dataclass(frozen=True)
class Choice:
    worker: WorkerHandle
    reason: str


class Selector(abc.ABC):
    name: str

    @abc.abstractmethod
    def pick(
        self,
        candidates: list[WorkerHandle],
        job: str,
        num_prompt_tokens: int,
        cached: CachedTokens,
    ) -> Choice:
        """One of `candidates` (never empty) for `job`."""


SELECTORS: dict[str, type[Selector]] = {}


def register_selector(name: str):
    def wrap(cls: type[Selector]) -> type[Selector]:
        cls.name = name
        SELECTORS[name] = cls
        return cls

    return wrap


def _least_loaded_key(job: str) -> Callable[[WorkerHandle], tuple]:
    if job == "prefill":  # what a new prompt waits behind there
        return lambda w: (w.pending_prefill_tokens, w.outstanding_tokens, w.num_assigned)
    return lambda w: (w.outstanding_tokens, w.num_assigned)


@register_selector("least_loaded")
class LeastLoaded(Selector):
    def __init__(self, weights: KVAwareWeights | None = None) -> None:
        pass

    def pick(self, candidates, job, num_prompt_tokens, cached) -> Choice:
        return Choice(min(candidates, key=_least_loaded_key(job)), "least_loaded")


@register_selector("round_robin")
class RoundRobin(Selector):
    def __init__(self, weights: KVAwareWeights | None = None) -> None:
        self._turns: dict[str, int] = {}  # per job

    def pick(self, candidates, job, num_prompt_tokens, cached) -> Choice:
        turn = self._turns.get(job, 0)
        self._turns[job] = turn + 1
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        return Choice(ordered[turn % len(ordered)], "round_robin")


@register_selector("kv_aware")
class KVAware(Selector):
    def __init__(self, weights: KVAwareWeights | None = None) -> None:
        self.weights = weights or KVAwareWeights()

    def load(self, worker: WorkerHandle) -> float:
        """A worker's load in tokens (see the module docstring)."""
        w = self.weights
        stats = worker.stats
        usage = 1.0 - stats.num_free_blocks / stats.num_blocks if stats and stats.num_blocks else 0
        return (
            w.queue_weight * worker.pending_prefill_tokens
            + w.running_weight * worker.num_assigned
            + w.usage_weight * usage
        )

    def pick(self, candidates, job, num_prompt_tokens, cached) -> Choice:
        loads = {w.worker_id: self.load(w) for w in candidates}
        hits = {w.worker_id: cached(w) for w in candidates}
        floor = min(loads.values())
        eligible = [w for w in candidates if loads[w.worker_id] - floor <= self.weights.load_margin]

        def cost(w: WorkerHandle) -> tuple:
            uncached = num_prompt_tokens - hits[w.worker_id]
            total = self.weights.prefill_weight * uncached + loads[w.worker_id]
            return (total, *_least_loaded_key(job)(w))

        best = min(eligible, key=cost)
        most = max(hits.values())
        if hits[best.worker_id] < most:
            reason = "load_over_prefix"
        elif most > 0:
            reason = "prefix_hit"
        else:
            reason = "load"
        return Choice(best, reason)


def make_selector(name: str, weights: KVAwareWeights | None = None) -> Selector:
    return SELECTORS[name](weights)
