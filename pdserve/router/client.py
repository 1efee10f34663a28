"""What the HTTP layer needs from the serving system: the `EngineClient` interface.

The FastAPI app (`router/app.py`) speaks OpenAI JSON and nothing else; everything behind
it — picking workers, remote or local prefill, KV hand-over, detokenising — sits behind
this small interface. Two implementations:

- `router/cluster.py`: the real one, driving worker processes over ZeroMQ;
- `tests/router/fakes.py`: an in-process engine, so the HTTP layer is tested without
  sockets or processes (the httpx habit: a transport interface with an in-memory fake).

A generation is an async iterator of `StreamUpdate`s. Each update carries, per sample,
only what is new (`SampleDelta`: text safe to show — a tail that could still become a stop
string is held back — plus the new token ids and logprobs) and the cumulative
`RequestOutput`. The iterator ends after the update in which every sample finished.

Errors: `InvalidRequestError` before any work (400), `ServiceUnavailableError` when no
worker can take it (503), `RequestFailedError` when it fails after being accepted. Closing
the iterator early (client went away) aborts the request everywhere.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from pdserve.outputs import SampleDelta, StreamUpdate  # noqa: F401  (re-exported)
from pdserve.sampling_params import SamplingParams
from pdserve.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    worker_id: str
    role: str  # "prefill" | "decode" | "mixed"
    is_alive: bool
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of the worker's KV blocks in use
    num_prefix_query_tokens: int = 0  # cumulative, as the worker reports them
    num_prefix_hit_tokens: int = 0
    kv_tiers: list = field(default_factory=list)  # ipc.messages.KVTierCounters
    num_tier_dropped_writes: int = 0


@dataclass(slots=True)
class Readiness:
    is_ready: bool
    reason: str = ""  # why not ready, for /ready's body
    workers: list[WorkerStatus] = field(default_factory=list)


class EngineClient(abc.ABC):
    """The serving system as the HTTP layer sees it."""

    model_name: str
    tokenizer: Tokenizer
    max_model_len: int

    @abc.abstractmethod
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise `InvalidRequestError` if the request can never be served (too long, bad
        ids, more KV blocks than a worker has). Cheap; no worker is contacted."""

    @abc.abstractmethod
    def generate(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> AsyncGenerator[StreamUpdate, None]:
        """Run one request (all `params.n` samples); see the module docstring. `priority`:
        lower is scheduled first (vLLM's convention)."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request on every worker involved and free its blocks. Idempotent."""

    @abc.abstractmethod
    def readiness(self) -> Readiness:
        """Whether every role the configured mode needs has a live worker."""

    def queued_prefill_tokens(self) -> int | None:
        """Prompt tokens waiting to be prefilled on the workers (admission's view of load
        it did not admit itself); None when unknown."""
        return None
