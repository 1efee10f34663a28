"""Trace replay for `pdserve bench`: `load_trace` turns a Mooncake-format JSONL trace into
`RequestSpec`s with send times.

The format (kvcache-ai/Mooncake's published traces, also read by aiperf and Dynamo) is one
JSON object per line:

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

`timestamp` is the arrival in milliseconds, `input_length`/`output_length` are token
counts, and `hash_ids` name the prompt's blocks of `block_tokens` (512) tokens in order:
two requests whose lists start with the same ids share that prefix. Traces carry no text,
so we write it: each hash id gets one block of words generated from the id (and `seed`),
a prompt is its blocks joined by single spaces, and the last block is cut down so the
prompt counts `input_length` tokens. Equal leading ids therefore give byte-identical
prefixes, and a prefix cache sees the sharing the trace recorded. Tokens a trace does not
cover with ids get text unique to the request. An optional string `session_id` is passed
through; other keys are ignored.

The BOS (or whatever special tokens the tokenizer adds) sits in front of the first
block, so blocks start one token later than in the original system; the sharing is the
same. With a tokenizer, lengths are exact and recorded in `num_prompt_tokens`; without
one, one word counts as one token (`bench/prompts.py`) and the field stays None.

Requests are replayed in timestamp order; `timestamp_s` is the time since the earliest
request, multiplied by `time_scale` (0.5 replays twice as fast). Every malformed line is
reported as a `ConfigError` naming the file and line number.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.prompts import PromptText
from pdserve.bench.types import RequestSpec
from pdserve.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One validated line of a trace."""

    line_number: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    session_id: str | None = None


def load_trace(
    path: str | Path,
    *,
    tokenizer: Any = None,
    max_requests: int | None = None,
    time_scale: float = 1.0,
    block_tokens: int = 512,
    seed: int = 0,
) -> list[RequestSpec]:
    """The trace's requests in timestamp order (the first `max_requests` lines of the file
    when given); `seed` changes every block's text, so replays start with a cold cache."""
    _check_options(max_requests, time_scale, block_tokens)
    rows = read_trace(path, max_requests=max_requests, block_tokens=block_tokens)
    builder = _PromptBuilder(PromptText(tokenizer), block_tokens, seed)
    start_ms = min(row.timestamp_ms for row in rows)
    return [
        builder.spec(row, (row.timestamp_ms - start_ms) / 1000 * time_scale)
        for row in sorted(rows, key=lambda row: row.timestamp_ms)
    ]


def read_trace(
    path: str | Path, *, max_requests: int | None = None, block_tokens: int = 512
) -> list[TraceRow]:
    """The validated rows of a trace file, in file order; blank lines are skipped."""
    path = Path(path)
    rows: list[TraceRow] = []
    try:
        with path.open(encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if max_requests is not None and len(rows) >= max_requests:
                    break
                if line.strip():
                    rows.append(_parse_line(path, line_number, line, block_tokens))
    except OSError as exc:
        raise ConfigError("trace", f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("trace", f"{path} is not UTF-8 text: {exc}") from exc
    if not rows:
        raise ConfigError("trace", f"{path} holds no requests")
    return rows


# ------------------------------------------------------------------------------- validation
def _check_options(max_requests: int | None, time_scale: float, block_tokens: int) -> None:
    if max_requests is not None and max_requests < 1:
        raise ConfigError("max_requests", f"must be >= 1, got {max_requests}")
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ConfigError("time_scale", f"must be a positive number, got {time_scale}")
    if block_tokens < 1:
        raise ConfigError("block_tokens", f"must be >= 1, got {block_tokens}")


def _parse_line(path: Path, line_number: int, line: str, block_tokens: int) -> TraceRow:
    def fail(message: str) -> ConfigError:
        return ConfigError("trace", f"{path} line {line_number}: {message}")

    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    missing = [key for key in ("timestamp", "input_length", "output_length") if key not in data]
    if missing:
        raise fail(f"missing {', '.join(repr(key) for key in missing)}")
    timestamp = data["timestamp"]
    if not _is_number(timestamp) or not math.isfinite(timestamp) or timestamp < 0:
        raise fail(f"'timestamp' must be a number of milliseconds >= 0, got {timestamp!r}")
    for key in ("input_length", "output_length"):
        if not _is_int(data[key]) or data[key] < 1:
            raise fail(f"{key!r} must be a positive integer, got {data[key]!r}")
    hash_ids = data.get("hash_ids", [])
    if not isinstance(hash_ids, list) or not all(_is_int(h) for h in hash_ids):
        raise fail(f"'hash_ids' must be a list of integers, got {hash_ids!r}")
    num_blocks = -(-data["input_length"] // block_tokens)
    if len(hash_ids) > num_blocks:
        raise fail(
            f"{len(hash_ids)} hash_ids for input_length {data['input_length']}, which fills "
            f"only {num_blocks} blocks of {block_tokens} tokens (is block_tokens right?)"
        )
    session_id = data.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        raise fail(f"'session_id' must be a string, got {session_id!r}")
    return TraceRow(
        line_number,
        float(timestamp),
        data["input_length"],
        data["output_length"],
        tuple(hash_ids),
        session_id,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------- prompts
class _PromptBuilder:
    """Prompts from hash ids: one cached block of words per id, so equal ids give equal text."""

    def __init__(self, text: PromptText, block_tokens: int, seed: int) -> None:
        self.text = text
        self.block_tokens = block_tokens
        self.seed = seed
        self._blocks: dict[int, list[str]] = {}

    def spec(self, row: TraceRow, timestamp_s: float) -> RequestSpec:
        prompt, count = self.prompt(row)
        return RequestSpec(
            prompt=prompt,
            max_tokens=row.output_length,
            num_prompt_tokens=self.text.measured(count),
            timestamp_s=timestamp_s,
            session_id=row.session_id,
        )

    def prompt(self, row: TraceRow) -> tuple[str, int]:
        """Full blocks, then the last block cut to what `input_length` leaves."""
        blocks = [self._block_words(row, index) for index in range(self._num_blocks(row))]
        head = " ".join(" ".join(words) for words in blocks[:-1])
        head_tokens = self.text.num_special_tokens + self.block_tokens * (len(blocks) - 1)
        tail = self.text.trim(blocks[-1], row.input_length - head_tokens)
        if not head and not tail:  # never an empty prompt
            tail = blocks[-1][:1]
        rng = random.Random(f"trace/{self.seed}/fill/{row.line_number}")
        return self.text.finish(rng, head, tail, row.input_length)

    def _num_blocks(self, row: TraceRow) -> int:
        """Blocks after the special tokens: a last block of those alone gets no words."""
        words = max(row.input_length - self.text.num_special_tokens, 1)
        return -(-words // self.block_tokens)

    def _block_words(self, row: TraceRow, index: int) -> list[str]:
        if index >= len(row.hash_ids):  # not covered by the trace: unique to this request
            rng = random.Random(f"trace/{self.seed}/line/{row.line_number}/{index}")
            return self.text.word_list(rng, self.block_tokens)
        hash_id = row.hash_ids[index]
        if hash_id not in self._blocks:
            rng = random.Random(f"trace/{self.seed}/block/{hash_id}")
            self._blocks[hash_id] = self.text.word_list(rng, self.block_tokens)
        return self._blocks[hash_id]
