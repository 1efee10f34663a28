"""`limits.queued_tokens_floor`: what the HTTP edge reads from a raw body to judge a
request at its own size — never more tokens than the route will count."""

from __future__ import annotations

import json

import pytest

from pdserve.router.gateway.limits import queued_tokens_floor


def floor(body, token_bytes: int = 4):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return queued_tokens_floor(raw, token_bytes)


def test_token_ids_count_exactly_times_n_with_the_priority():
    assert floor({"prompt": [5] * 256}) == (256, 0)
    assert floor({"prompt": [5] * 10, "n": 3, "priority": -2}) == (30, -2)
    assert floor({"prompt": [[1, 2], [3, 4, 5]]}) == (5, 0)


def test_text_counts_bytes_over_the_longest_token():
    assert floor({"prompt": "x" * 41}, token_bytes=4) == (10, 0)
    assert floor({"prompt": "é" * 4}, token_bytes=4) == (2, 0)  # UTF-8 bytes, not chars
    assert floor({"prompt": "hi"}, token_bytes=16) == (1, 0)  # never below one token
    assert floor({"prompt": ["x" * 8, [1, 2, 3]]}, token_bytes=4) == (5, 0)


def test_chat_counts_the_text_of_its_messages():
    messages = [
        {"role": "system", "content": "a" * 16},
        {"role": "user", "content": [{"type": "text", "text": "b" * 8}, {"type": "image"}]},
    ]
    assert floor({"messages": messages, "priority": 1}, token_bytes=4) == (6, 1)


@pytest.mark.parametrize(
    "body",
    [
        b"{not JSON",
        b"[1, 2]",
        {"prompt": []},
        {"prompt": None},
        {"prompt": [1, "x"]},
        {"prompt": [1], "priority": "high"},
        {"prompt": [1], "priority": 1.5},
        {"prompt": [1], "n": 0},
        {"prompt": [1], "n": True},
        {"messages": "hi"},
    ],
)
def test_a_body_that_does_not_say_gives_none(body):
    assert floor(body) is None
