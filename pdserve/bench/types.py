"""The values every part of `pdserve bench` shares: what to send, what was measured.

- `RequestSpec`: one request of a workload or trace — the prompt (text, or chat
  messages), how many tokens to generate, and when to send it (trace replay only).
- `RequestRecord`: what the load generator measured for one request, with token counts
  taken from the server's `usage`, never guessed.
- `SLO`: latency targets; a request meets them when its TTFT and its TPOT are both
  within.
- `RunResult`: one run's configuration and records; summaries are computed from it
  (`bench/metrics.py`), so a saved JSON can be re-summarised or compared later.

Torch-free, like everything in `bench/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str | list[int] | None = None  # for /v1/completions: text or token ids
    messages: list[dict[str, str]] | None = None  # for /v1/chat/completions
    max_tokens: int = 128
    num_prompt_tokens: int | None = None  # the workload's estimate; usage is authoritative
    timestamp_s: float | None = None  # trace replay: send this long after the start
    session_id: str | None = None  # shared-prefix workloads: requests of one conversation
    extra_body: dict[str, Any] | None = None  # merged into this request's body (phases)


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_ms: float
    tpot_ms: float

    def is_met(self, record: RequestRecord) -> bool:
        if not record.is_ok or record.ttft_s is None:
            return False
        tpot = record.tpot_s
        return record.ttft_s * 1e3 <= self.ttft_ms and (tpot is None or tpot * 1e3 <= self.tpot_ms)


@dataclass(slots=True)
class RequestRecord:
    start_s: float  # since the run began
    num_prompt_tokens: int = 0  # from usage
    num_output_tokens: int = 0  # from usage
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed chunks
    e2e_s: float | None = None
    error: str | None = None  # HTTP status and message, or the exception
    has_usage: bool = True  # False: the server sent no usage, so the token counts are 0
    # usage.prompt_tokens_details.cached_tokens (prefix-cache hit), where the server says
    num_cached_tokens: int | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (outputs - 1)."""
        if self.e2e_s is None or self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


@dataclass(slots=True)
class RunResult:
    config: dict[str, Any]  # url, model, workload, arrival, rate/concurrency, seed, ...
    records: list[RequestRecord]
    duration_s: float  # from the first send to the last completion


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Milliseconds (or the unit named by the field holding it)."""

    mean: float
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True, slots=True)
class Summary:
    """What `bench/metrics.summarize` computes from a `RunResult`."""

    num_requests: int
    num_ok: int
    num_errors: int
    duration_s: float
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second (from usage)
    total_token_throughput: float  # prompt + output tokens per second
    ttft_ms: Percentiles | None
    tpot_ms: Percentiles | None
    itl_ms: Percentiles | None
    e2e_ms: Percentiles | None
    slo: SLO | None = None
    slo_attainment: float | None = None  # fraction of all requests meeting both SLOs
    goodput: float | None = None  # requests per second meeting both SLOs
    cost_per_million_output_tokens: float | None = None  # from a price per machine-hour
    num_without_usage: int = 0  # successful requests whose server sent no usage (counted 0)
    # Prompt tokens served from the prefix cache / prompt tokens, over the requests whose
    # usage carried `prompt_tokens_details.cached_tokens`; None when none did.
    prefix_cache_hit_rate: float | None = None
