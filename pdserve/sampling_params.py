"""`SamplingParams`: how to pick tokens and when to stop, per request.

Field names and defaults follow vLLM's so that code moving from vLLM keeps working.
Validation happens once, at construction; a bad value raises `InvalidRequestError` naming
the parameter (the API layer turns that into an OpenAI 400). No torch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from pdserve.errors import InvalidRequestError

# Temperatures below this are treated as greedy (argmax): dividing by ~0 only adds noise.
GREEDY_EPSILON = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return besides the sampled token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Accept the loose forms vLLM accepts (a single stop string, lists).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "seed"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and not isinstance(value, bool)),
                name,
                f"must be an integer, got {value!r}",
            )
        _check(self.n is not None and self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(
            self.top_k is not None and self.top_k >= 0,
            "top_k",
            f"must be -1, 0 (disabled) or positive, got {self.top_k}",
        )
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            f"must be at least 1, got {self.max_tokens}",
        )
        _check(
            self.min_tokens is not None and self.min_tokens >= 0,
            "min_tokens",
            f"must be >= 0, got {self.min_tokens}",
        )
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must not exceed max_tokens={self.max_tokens}, got {self.min_tokens}",
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            "logprobs",
            f"must be between 0 and 20, got {self.logprobs}",
        )
        _check(all(s for s in self.stop), "stop", "stop strings must be non-empty")
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be non-negative integers",
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{param} {message}", param=param)


def token_seed(seed: int, index: int) -> int:
    """A 63-bit seed for token `index` of a request seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Parameters of sample `index` of an n>1 request, run as its own engine request.

    A seeded sample i > 0 gets its own seed, derived so that it cannot equal another
    request's seed + something: otherwise all n samples would be the same.
    """
    changes: dict[str, Any] = {"n": 1}
    if params.seed is not None and index:
        changes["seed"] = token_seed(params.seed, -index)
    return params.replace(**changes)
