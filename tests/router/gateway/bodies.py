"""Hypothesis strategies for hostile OpenAI request bodies, shared by the in-process and
the live-server fuzz tests.

Three kinds of body, in equal parts: valid ones with values at the edges (they reach the
engine and must not hurt it); the same with one field poisoned (int64 +-1, 2**80, 1e20,
inf, NaN, junk: the value that slips through one check); and hostile ones where any field
may be junk of any JSON type, with unknown and unsupported fields mixed in. Output length stays small (max_tokens is a few tokens or
invalid; n at most 3 when valid) so a valid example costs milliseconds of engine time.
Bodies are serialised with `allow_nan`, and some numbers are written as `1e400` (inf to a
JSON parser), some bodies are cut short (malformed JSON).
"""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

INT64 = 2**63
EDGE_INTS = [0, 1, -1, INT64 - 1, INT64, -INT64, -INT64 - 1, 2**64, 2**80, 10**20]
EDGE_FLOATS = [0.0, 1e-9, 0.5, 1.0, 2.0, -0.5, 1e308, -1e308]
UNSUPPORTED = ["tools", "tool_choice", "response_format", "logit_bias", "suffix", "functions"]

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2),
)
floats = st.one_of(
    st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3),
)
ints = st.one_of(st.integers(-2, 5), st.sampled_from(EDGE_INTS), st.floats(-1e20, 1e20))
small_ints = st.one_of(st.integers(1, 3), st.sampled_from(EDGE_INTS), st.floats(0, 1e20))
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


def _field(good: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(good, good, good, junk)


# Valid values, edges included: these reach the engine, and must not hurt it.
VALID_SAMPLING = {
    "temperature": st.one_of(st.sampled_from([0.0, 1e-9, 0.7, 2.0, 1e308]), st.floats(0, 5)),
    "top_p": st.one_of(st.just(1.0), st.floats(1e-9, 1.0)),
    "top_k": st.one_of(st.integers(-1, 50), st.sampled_from([INT64 - 1, 40000])),
    "min_p": st.floats(0, 1),
    "seed": st.one_of(st.integers(-5, 5), st.sampled_from([INT64 - 1, -INT64])),
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 4),
    "min_tokens": st.integers(0, 2),
    "stop": st.one_of(texts, st.lists(texts.filter(bool), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 40000), max_size=3),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "priority": st.one_of(st.integers(-3, 3), st.sampled_from([INT64 - 1, -INT64])),
    "timeout": st.floats(5, 60),
}
HOSTILE_SAMPLING = {
    "temperature": _field(floats),
    "top_p": _field(floats),
    "top_k": _field(ints),
    "min_p": _field(floats),
    "seed": _field(ints),
    "n": _field(small_ints),
    "max_tokens": _field(small_ints),
    "min_tokens": _field(st.integers(-1, 3)),
    "stop": _field(st.one_of(texts, st.lists(texts, max_size=20))),
    "stop_token_ids": _field(st.lists(ints, max_size=3)),
    "ignore_eos": _field(st.booleans()),
    "stream": st.booleans(),
    "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "presence_penalty": _field(floats),
    "priority": _field(ints),
    "timeout": _field(st.one_of(st.floats(-1, 30), st.just(1e400))),
    "model": _field(st.sampled_from(["pdserve-tiny", "other"])),
    **{name: junk for name in UNSUPPORTED},
    "x-unknown": junk,
}
VALID_PROMPT = st.one_of(
    texts.filter(str.strip),
    st.lists(texts.filter(str.strip), min_size=1, max_size=2),
    st.lists(st.integers(0, 31999), min_size=1, max_size=8),
)
PROMPT = st.one_of(
    texts,
    st.lists(texts, min_size=0, max_size=3),
    st.lists(st.one_of(st.integers(-2, 40000), st.sampled_from(EDGE_INTS)), max_size=8),
    st.lists(st.lists(st.integers(0, 100), min_size=1, max_size=4), max_size=2),
    junk,
)
CONTENT = st.one_of(
    texts,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2),
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "bot"])},
    optional={"content": st.one_of(CONTENT, junk)},
)
VALID_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": CONTENT}
)


POISONS = st.one_of(
    st.sampled_from([*EDGE_INTS, *EDGE_FLOATS, math.inf, -math.inf, math.nan, 1e20, -2]),
    junk,
)


@st.composite
def poisoned(draw, valid: st.SearchStrategy[dict]) -> dict:
    """A valid body with one field set to an extreme or wrong value: the request the
    engine would run if that one value slipped through."""
    body = draw(valid)
    name = draw(st.sampled_from([*VALID_SAMPLING, "logprobs", "top_logprobs", "n", "stop"]))
    return {**body, name: draw(POISONS)}


def completion_bodies() -> st.SearchStrategy[dict]:
    """Valid bodies with edge values, the same with one poisoned field, hostile ones."""
    valid = st.fixed_dictionaries(
        {"prompt": VALID_PROMPT},
        optional={**VALID_SAMPLING, "logprobs": st.integers(0, 5), "echo": st.booleans()},
    ).map(lambda body: {"max_tokens": 4, **body})
    hostile = st.fixed_dictionaries(
        {"prompt": PROMPT},
        optional={**HOSTILE_SAMPLING, "logprobs": _field(ints), "echo": _field(st.booleans())},
    )
    return st.one_of(valid, poisoned(valid), hostile)


def chat_bodies() -> st.SearchStrategy[dict]:
    valid = st.fixed_dictionaries(
        {"messages": st.lists(VALID_MESSAGE, min_size=1, max_size=3)},
        optional={
            **VALID_SAMPLING,
            "max_completion_tokens": st.integers(1, 4),
            "logprobs": st.just(True),
            "top_logprobs": st.integers(0, 20),
        },
    ).map(lambda body: {"max_tokens": 4, **body})
    hostile = st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(MESSAGE, max_size=3), junk)},
        optional={
            **HOSTILE_SAMPLING,
            "logprobs": _field(st.booleans()),
            "top_logprobs": _field(ints),
            "max_completion_tokens": _field(small_ints),
        },
    )
    return st.one_of(valid, poisoned(valid), hostile)


@st.composite
def raw_json(draw, bodies: st.SearchStrategy[dict]) -> str:
    """A body as the client sends it: JSON (NaN/Infinity allowed), sometimes with an
    overflowing `1e400`, sometimes cut short."""
    text = json.dumps(draw(bodies), allow_nan=True)
    mutation = draw(st.sampled_from(["none"] * 6 + ["1e400", "truncate"]))
    if mutation == "1e400":
        text = text.replace("Infinity", "1e400")
    elif mutation == "truncate" and len(text) > 2:
        text = text[: draw(st.integers(1, len(text) - 1))]
    return text
