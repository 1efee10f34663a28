"""`GatewayConfig`: the settings of the HTTP edge (limits, admission, keys, connections).

One frozen dataclass, validated at construction (a bad value raises `ConfigError` naming
the field), built by `pdserve serve` from its flat YAML keys and flags (`serve.py`) and
handed to `build_app`. Every limit has a default that keeps a public server safe: the
defaults reject nothing a well-formed OpenAI request sends, but bound what a hostile one
can make the router or a worker do.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    # -- input limits (gateway/limits.py), all checked before tokenisation
    max_body_bytes: int = 4 * MIB  # 413 above; from Content-Length and while reading
    max_n: int = 128  # samples per prompt
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_stop: int = 16  # stop strings
    max_stop_chars: int = 256  # characters of one stop string
    max_stop_token_ids: int = 64
    # Prompt text bytes above which a prompt cannot fit the context, whatever the
    # tokenizer: None derives it (the context x the longest token's bytes).
    max_prompt_bytes: int | None = None
    # -- admission (gateway/admission.py)
    admission_ttft_ms: float | None = None  # predicted TTFT above this: 429 at once
    admission_prefill_tokens_per_s: float = 2000.0  # prior until TTFTs are measured
    max_queued_requests: int | None = None  # admitted without a first token; 429 past it
    request_timeout_s: float | None = None  # default deadline; the `timeout` field wins
    # Generation requests in flight at once; past it 503 `server_busy` (gateway/edge.py)
    limit_concurrency: int | None = None
    # -- API keys (gateway/keys.py)
    api_key: str | None = None  # one key without quotas, named "default"
    api_keys_file: str | None = None  # YAML `keys:` list with quotas
    protect_probes: bool = False  # /metrics, /ready and /docs need a key too

    def __post_init__(self) -> None:
        positive = ("max_body_bytes", "max_n", "max_prompts", "max_stop", "max_stop_chars")
        limits = ("max_prompt_bytes", "max_queued_requests", "limit_concurrency")
        for name in (*positive, *limits):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(name, f"must be positive, got {value}")
        if self.max_stop_token_ids < 0:
            raise ConfigError("max_stop_token_ids", "must be >= 0")
        for name in ("admission_ttft_ms", "request_timeout_s", "admission_prefill_tokens_per_s"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                raise ConfigError(name, f"must be a positive number, got {value}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key", "is empty: leave it unset to serve without keys")
        if self.api_keys_file == "":
            raise ConfigError("api_keys", "empty path: leave it unset to serve without keys")
        if self.protect_probes and not self.has_keys:
            raise ConfigError("protect_probes", "needs api_key or api_keys to protect with")

    @property
    def has_keys(self) -> bool:
        return self.api_key is not None or self.api_keys_file is not None
