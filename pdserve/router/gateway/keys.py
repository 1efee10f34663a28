"""API keys and their quotas: who is calling, and may they call now.

Owns: the key ring (`--api-key`, and `--api-keys FILE`), bearer-token authentication, and
per-key token buckets for requests and tokens per minute plus a concurrency cap.

The keys file is YAML:

    keys:
      - name: team-a
        key: sk-team-a-...            # or key_sha256: <64 hex digits>
        requests_per_minute: 600      # optional; each limit is off when absent
        tokens_per_minute: 200000
        max_concurrent: 16

Authentication hashes the presented token with SHA-256 and compares it with *every*
stored digest using `hmac.compare_digest`, without stopping at a match, so neither the
time taken nor its variation says which key (or how much of one) matched. Storing
`key_sha256` keeps plain keys out of the file.

Quotas are token buckets (capacity = the per-minute limit, refilled continuously), as
OpenAI's own limits are: a request takes one request token at once, and its prompt tokens
plus `max_tokens` x n token tokens once tokenised; what it did not generate is given back
when it ends. A request over a limit is answered 429 with `Retry-After` and OpenAI's
`x-ratelimit-*` headers; accepted requests carry the same headers.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.errors import ConfigError

KEY_FIELDS = {"name", "key", "key_sha256", "requests_per_minute", "tokens_per_minute"}
KEY_FIELDS |= {"max_concurrent"}
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")


class TokenBucket:
    """`capacity` tokens, refilled at `capacity` per minute; never above capacity."""

    def __init__(self, capacity: int, clock=time.monotonic) -> None:
        self.capacity = capacity
        self.rate = capacity / 60.0  # per second
        self.clock = clock
        self.level = float(capacity)
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self, amount: float) -> bool:
        self._refill()
        if amount > self.level:
            return False
        self.level -= amount
        return True

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def seconds_until(self, amount: float) -> float:
        """How long until `amount` could be taken (inf if it exceeds the capacity)."""
        self._refill()
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    @property
    def remaining(self) -> int:
        self._refill()
        return int(self.level)

    @property
    def seconds_to_full(self) -> float:
        self._refill()
        return (self.capacity - self.level) / self.rate


@dataclass(eq=False)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the key
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    requests: TokenBucket | None = field(default=None, repr=False)
    tokens: TokenBucket | None = field(default=None, repr=False)
    num_running: int = 0

    def __post_init__(self) -> None:
        if self.requests_per_minute is not None:
            self.requests = TokenBucket(self.requests_per_minute)
        if self.tokens_per_minute is not None:
            self.tokens = TokenBucket(self.tokens_per_minute)


def sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Every key the server accepts."""

    def __init__(self, keys: list[ApiKey]) -> None:
        names = [k.name for k in keys]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ConfigError("api_keys", f"key name {duplicate!r} appears twice")
        self.keys = keys

    @classmethod
    def build(cls, api_key: str | None, api_keys_file: str | None) -> KeyRing | None:
        """The ring of `--api-key` (named "default") and the keys file; None if neither."""
        keys = []
        if api_key is not None:
            keys.append(ApiKey("default", sha256(_non_empty_key(api_key, "api_key"))))
        if api_keys_file is not None:
            keys += load_keys_file(Path(api_keys_file))
        return cls(keys) if keys else None

    def authenticate(self, token: str) -> ApiKey | None:
        digest = sha256(token)
        found = None
        for key in self.keys:  # NOTE: no early exit; every digest is compared
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def load_keys_file(path: Path) -> list[ApiKey]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("api_keys", f"{path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError("api_keys", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise ConfigError("api_keys", f"{path} must hold a non-empty `keys:` list")
    return [_parse_key(entry, f"api_keys.keys[{i}]") for i, entry in enumerate(data["keys"])]


def _parse_key(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise ConfigError(where, "must be a mapping with name and key (or key_sha256)")
    unknown = sorted(set(entry) - KEY_FIELDS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown; known: {sorted(KEY_FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name", "must be a non-empty string")
    if ("key" in entry) == ("key_sha256" in entry):
        raise ConfigError(where, "needs exactly one of key and key_sha256")
    if "key" in entry:
        digest = sha256(_non_empty_key(entry["key"], f"{where}.key"))
    else:
        digest = _parse_digest(entry["key_sha256"], f"{where}.key_sha256")
    limits = {}
    for limit in LIMIT_FIELDS:
        value = entry.get(limit)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{limit}", f"must be a positive integer, got {value!r}")
        if value is not None and value <= 0:
            raise ConfigError(f"{where}.{limit}", f"must be positive, got {value}")
        limits[limit] = value
    return ApiKey(name.strip(), digest, **limits)


def _non_empty_key(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(where, "is empty: an empty key would let anyone in")
    return value


def _parse_digest(value: Any, where: str) -> bytes:
    try:
        digest = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ConfigError(where, "must be 64 hex digits (sha256sum of the key)")
    return digest


# -- quotas -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    limit: str  # "requests" | "tokens" | "concurrency"
    message: str
    retry_after_s: float


def take_request(key: ApiKey) -> QuotaRefusal | None:
    """Start a request for `key`: one request token and a concurrency slot, or a refusal."""
    if key.max_concurrent is not None and key.num_running >= key.max_concurrent:
        return QuotaRefusal(
            "concurrency",
            f"key {key.name!r} already has {key.num_running} requests running "
            f"(max_concurrent {key.max_concurrent})",
            1.0,
        )
    if key.requests is not None and not key.requests.try_take(1):
        return QuotaRefusal(
            "requests",
            f"rate limit reached for key {key.name!r}: {key.requests_per_minute} requests "
            "per minute",
            key.requests.seconds_until(1),
        )
    key.num_running += 1
    return None


def take_tokens(key: ApiKey, amount: int) -> QuotaRefusal | None:
    if key.tokens is None or key.tokens.try_take(amount):
        return None
    wait = key.tokens.seconds_until(amount)
    if math.isinf(wait):
        message = (
            f"request too large for key {key.name!r}: it may use {amount} tokens "
            f"(prompt + max_tokens x n) but the limit is {key.tokens_per_minute} per "
            "minute; lower max_tokens"
        )
        wait = 60.0
    else:
        message = (
            f"rate limit reached for key {key.name!r}: {key.tokens_per_minute} tokens per "
            f"minute; this request may use {amount}"
        )
    return QuotaRefusal("tokens", message, wait)


def end_request(key: ApiKey, unused_tokens: int) -> None:
    key.num_running -= 1
    if key.tokens is not None and unused_tokens > 0:
        key.tokens.give_back(unused_tokens)


def rate_limit_headers(key: ApiKey) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the limits `key` has."""
    headers = {}
    for kind, bucket in (("requests", key.requests), ("tokens", key.tokens)):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
            headers[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.seconds_to_full)
    return headers


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
