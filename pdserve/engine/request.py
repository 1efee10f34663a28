"""A request inside the engine: its tokens, progress, blocks and status.

Progress is one number, `num_computed_tokens`: how many of the request's tokens (prompt
then outputs) have their KV in the cache. Each step the scheduler lets it catch up towards
`num_tokens` under the token budget; a prompt that takes several steps is chunked prefill,
a request one token behind is decoding. There is no separate prefill/decode state.

Only the scheduler changes `status`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pdserve.kv.block_hash import ROOT_HASH, BlockHash, hash_block
from pdserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    WAITING_FOR_KV = enum.auto()  # decode worker: blocks reserved, KV coming from a prefill worker
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything from here on is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    # Prefill worker: the prompt's KV and first token went to a decode worker, which
    # continues the request; for the client it is not finished.
    FINISHED_HANDED_OFF = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self >= _FIRST_FINISHED  # a module constant: an enum member read is slow

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FIRST_FINISHED = RequestStatus.FINISHED_STOPPED
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16  # resolved against the context length by the engine
    priority: int = 0  # lower runs first, as in vLLM
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # time.monotonic() of its first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    stop_reason: str | int | None = None
    # Prefill worker: where this request's KV goes (a `KVDestination`); the request then
    # stops after its first token. None for requests that run to the end here.
    kv_dest: object | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + outputs, without building the full list."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - num_prompt]

    def update_block_hashes(self, block_size: int) -> list[BlockHash]:
        """Extend the hash chain over every full block of the known tokens; return it."""
        num_full = self.num_tokens // block_size
        while len(self.block_hashes) < num_full:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else ROOT_HASH
            tokens = self.token_ids(i * block_size, (i + 1) * block_size)
            self.block_hashes.append(hash_block(parent, tokens))
        return self.block_hashes

    @property
    def is_finished(self) -> bool:
        return self.status >= _FIRST_FINISHED  # RequestStatus.is_finished, inlined (hot)
