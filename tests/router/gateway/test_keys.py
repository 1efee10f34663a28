"""API keys: the keys file, constant-time lookup, and token-bucket quotas."""

from __future__ import annotations

import hashlib

import pytest

from pdserve.errors import ConfigError
from pdserve.router.gateway import keys as k

SHA = hashlib.sha256(b"sk-hashed").hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write(tmp_path, text: str):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return str(path)


def test_keys_file_with_plain_and_hashed_keys(tmp_path):
    path = write(
        tmp_path,
        f"keys:\n  - {{name: a, key: sk-a, requests_per_minute: 5}}\n"
        f"  - {{name: b, key_sha256: {SHA}, max_concurrent: 2}}\n",
    )
    ring = k.KeyRing.build("sk-default", path)
    assert [key.name for key in ring.keys] == ["default", "a", "b"]
    assert ring.authenticate("sk-a").name == "a"
    assert ring.authenticate("sk-hashed").max_concurrent == 2
    assert ring.authenticate("sk-default").name == "default"
    assert ring.authenticate("sk-b") is None
    assert ring.authenticate("") is None


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("keys:\n  - {name: a, key: ''}\n", "api_keys.keys[0].key"),
        ("keys:\n  - {name: a, key: '   '}\n", "api_keys.keys[0].key"),
        ("keys:\n  - {name: a}\n", "api_keys.keys[0]"),
        ("keys:\n  - {name: a, key: x, key_sha256: " + SHA + "}\n", "api_keys.keys[0]"),
        ("keys:\n  - {name: a, key_sha256: abc}\n", "api_keys.keys[0].key_sha256"),
        (
            "keys:\n  - {name: a, key: x, tokens_per_minute: 0}\n",
            "api_keys.keys[0].tokens_per_minute",
        ),
        ("keys:\n  - {name: a, key: x, max_concurrent: 1.5}\n", "api_keys.keys[0].max_concurrent"),
        ("keys:\n  - {name: a, key: x, rpm: 3}\n", "api_keys.keys[0].rpm"),
        ("keys:\n  - {name: '', key: x}\n", "api_keys.keys[0].name"),
        ("keys: []\n", "api_keys"),
        ("keys:\n  - {name: a, key: x}\n  - {name: a, key: y}\n", "api_keys"),
    ],
)
def test_a_bad_keys_file_is_a_config_error_naming_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as info:
        k.KeyRing.build(None, write(tmp_path, text))
    assert info.value.field == field


def test_an_empty_single_key_is_a_config_error_not_auth_off():
    with pytest.raises(ConfigError):
        k.KeyRing.build("", None)
    assert k.KeyRing.build(None, None) is None


def test_token_bucket_refills_continuously_up_to_capacity():
    clock = Clock()
    bucket = k.TokenBucket(60, clock)  # one per second
    assert bucket.try_take(60) and not bucket.try_take(1)
    assert bucket.seconds_until(3) == pytest.approx(3.0)
    clock.now = 2.5
    assert bucket.remaining == 2 and bucket.try_take(2)
    bucket.give_back(1000)
    assert bucket.remaining == 60
    assert bucket.seconds_until(61) == float("inf")


def test_quotas_refuse_with_the_limit_that_was_hit():
    key = k.ApiKey("a", k.sha256("x"), requests_per_minute=2, tokens_per_minute=100)
    key.max_concurrent = 5
    assert k.take_request(key) is None and k.take_request(key) is None
    refusal = k.take_request(key)
    assert refusal.limit == "requests" and refusal.retry_after_s == pytest.approx(30, rel=0.01)
    assert k.take_tokens(key, 80) is None
    refusal = k.take_tokens(key, 30)
    assert refusal.limit == "tokens" and "100 tokens per minute" in refusal.message
    assert "request too large" in k.take_tokens(key, 101).message
    k.end_request(key, unused_tokens=50)  # gave back what it did not generate
    assert k.take_tokens(key, 60) is None
    assert key.num_running == 1


def test_concurrency_cap():
    key = k.ApiKey("a", k.sha256("x"), max_concurrent=1)
    assert k.take_request(key) is None
    assert k.take_request(key).limit == "concurrency"
    k.end_request(key, 0)
    assert k.take_request(key) is None


def test_rate_limit_headers_and_reset_format():
    key = k.ApiKey("a", k.sha256("x"), requests_per_minute=60, tokens_per_minute=6000)
    assert k.take_request(key) is None
    headers = k.rate_limit_headers(key)
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["x-ratelimit-limit-tokens"] == "6000"
    assert headers["x-ratelimit-remaining-tokens"] == "6000"
    assert headers["x-ratelimit-reset-tokens"] == "0ms"
    assert [k.format_duration(s) for s in (0.02, 1.5, 360, 61.25)] == [
        "20ms",
        "1.5s",
        "6m0s",
        "1m1.25s",
    ]
