"""Whether a request can ever be served: one check shared by the engine and the router.

Torch-free, so the router rejects an impossible request (HTTP 400) before any worker
does work, with exactly the message and parameter the engine itself would give.
"""

from __future__ import annotations

import math

from pdserve.errors import InvalidRequestError
from pdserve.sampling_params import SamplingParams


def check_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    max_model_len: int,
    vocab_size: int,
    block_size: int | None = None,
    num_blocks: int | None = None,
) -> int:
    """Raise `InvalidRequestError` naming the parameter if the request cannot be served;
    return its resolved `max_tokens` (the remaining context when unset)."""
    check_sampling_values(params)
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise InvalidRequestError("the prompt must contain at least one token", "prompt")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if any(t >= vocab_size for t in params.stop_token_ids):
        raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")
    room = max_model_len - num_prompt
    if room <= 0:
        raise InvalidRequestError(
            f"the prompt has {num_prompt} tokens; this model's context is "
            f"{max_model_len} tokens, leaving no room to generate",
            "prompt",
        )
    max_tokens = params.max_tokens if params.max_tokens is not None else room
    if max_tokens > room:
        raise InvalidRequestError(
            f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds the "
            f"model's context length of {max_model_len} tokens",
            "max_tokens",
        )
    if block_size is not None and num_blocks is not None:
        needed = -(-(num_prompt + max_tokens) // block_size)
        if needed > num_blocks:
            raise InvalidRequestError(
                f"the request needs up to {needed} KV blocks but the pool has only "
                f"{num_blocks}; lower max_tokens or enlarge the KV cache",
                "max_tokens",
            )
    return max_tokens


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The sampler divides float32 logits by the temperature: past float32's range (3.4e38) it
# becomes inf and the row NaN. Long before that, sampling is already uniform.
MAX_TEMPERATURE = 1e6


def check_sampling_values(params: SamplingParams) -> None:
    """Finite floats, a temperature the sampler can divide by, and int64 integers only:
    `inf` or `1e39` temperature or a seed past 64 bits would otherwise reach the sampler
    (or the wire) and fail there, not here."""
    for name in ("temperature", "top_p", "min_p"):
        value = getattr(params, name)
        if not math.isfinite(value):
            raise InvalidRequestError(f"{name} must be a finite number, got {value}", name)
    if params.temperature > MAX_TEMPERATURE:
        raise InvalidRequestError(
            f"temperature must be at most {MAX_TEMPERATURE:g}, got {params.temperature}",
            "temperature",
        )
    for name in ("n", "seed", "top_k", "max_tokens", "min_tokens", "logprobs"):
        value = getattr(params, name)
        if value is not None and not INT64_MIN <= value <= INT64_MAX:
            raise InvalidRequestError(f"{name} must fit in 64 bits, got {value}", name)
    if any(not 0 <= t <= INT64_MAX for t in params.stop_token_ids):
        raise InvalidRequestError("stop_token_ids must fit in 64 bits", "stop_token_ids")
