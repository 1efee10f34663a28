"""What a request returns: `RequestOutput` with one `CompletionOutput` per sample (n).

Shaped like vLLM's classes of the same names so user code ports unchanged. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None


# Per generated token: {token_id: Logprob} for the sampled token and the top alternatives.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that matched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: None = field(default=None)  # not supported yet; kept for vLLM parity


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one request: at most one new token, maybe a finish."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    # Seconds from arrival to first scheduling, on the output carrying the first token.
    queue_time_s: float | None = None
    # Output index of `new_token_ids[0]` (the request's outputs before it). The router puts
    # tokens from several workers in order by it (a decode worker's second token can
    # overtake the prefill worker's first on another socket). None: unknown.
    first_index: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class SampleDelta:
    index: int
    text: str  # new text since the previous update, stop-string safe
    token_ids: list[int]  # new token ids since the previous update
    logprobs: list[dict[int, Logprob]] | None = None  # one entry per new token id
    finish_reason: str | None = None  # set in the update where this sample finishes
    stop_reason: str | int | None = None


@dataclass(slots=True)
class StreamUpdate:
    deltas: list[SampleDelta]  # only the samples that changed
    output: RequestOutput  # cumulative state of every sample
    finished: bool = False
