"""Mooncake trace replay (`bench/trace.py`): equal leading hash ids give byte- and
token-identical prefixes, lengths are exact with the tokenizer, timestamps are relative
and scaled, and every malformed line is reported with its number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.bench.trace import load_trace, read_trace
from pdserve.errors import ConfigError

SAMPLE = Path(__file__).parents[2] / "benchmarks" / "traces" / "sample_mooncake.jsonl"


@pytest.fixture(scope="module")
def tokenizer(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(builtin_model_dir)


def row(timestamp=0, input_length=600, output_length=16, hash_ids=(0, 1), **extra) -> dict:
    return {
        "timestamp": timestamp,
        "input_length": input_length,
        "output_length": output_length,
        "hash_ids": hash_ids if hash_ids is None else list(hash_ids),
        **extra,
    }


def write_trace(tmp_path: Path, *rows: dict | str) -> Path:
    path = tmp_path / "trace.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_sample_trace_replays_exact_lengths_and_times(tokenizer):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert len(rows) == 20
    specs = load_trace(SAMPLE, tokenizer=tokenizer)
    for spec, data in zip(specs, rows, strict=True):  # the file is already in time order
        assert spec.timestamp_s == pytest.approx(data["timestamp"] / 1000)
        assert spec.max_tokens == data["output_length"]
        assert spec.num_prompt_tokens == len(tokenizer.encode(spec.prompt)) == data["input_length"]


def test_equal_leading_hash_ids_share_prefix_text_and_tokens(tmp_path, tokenizer):
    path = write_trace(
        tmp_path,
        row(input_length=1500, hash_ids=[1, 2, 3]),
        row(input_length=1300, hash_ids=[1, 2, 4]),
        row(input_length=1200, hash_ids=[1, 2, 3]),  # a shorter request of the first's blocks
        row(input_length=300, hash_ids=[5]),
    )
    a, b, c, d = load_trace(path, tokenizer=tokenizer)
    ids = [tokenizer.encode(spec.prompt) for spec in (a, b, c, d)]
    # BOS + two shared blocks of 512 tokens; blocks 3 and 4 differ from their first word
    # (unless the first words agree by chance, 1 in 508)
    assert 1 + 1024 <= common_prefix(ids[0], ids[1]) <= 1 + 1024 + 1
    shared_text = " ".join(a.prompt.split()[:1024])
    assert b.prompt.startswith(shared_text + " ")
    assert a.prompt.startswith(c.prompt + " ")  # the cut last block is a prefix of the full one
    assert common_prefix(ids[0], ids[3]) <= 2


def test_tokens_beyond_the_hash_ids_are_unique_to_the_request(tmp_path, tokenizer):
    path = write_trace(
        tmp_path,
        row(input_length=1500, hash_ids=[7]),
        row(input_length=1500, hash_ids=[7]),
    )
    a, b = load_trace(path, tokenizer=tokenizer)
    assert 1 + 512 <= common_prefix(tokenizer.encode(a.prompt), tokenizer.encode(b.prompt)) <= 514
    assert a.num_prompt_tokens == b.num_prompt_tokens == 1500


def test_without_a_tokenizer_a_word_is_a_token():
    specs = load_trace(SAMPLE, max_requests=5)
    lengths = [json.loads(line)["input_length"] for line in SAMPLE.read_text().splitlines()]
    assert [len(spec.prompt.split()) + 1 for spec in specs] == lengths[:5]
    assert all(spec.num_prompt_tokens is None for spec in specs)


def test_timestamps_are_sorted_relative_and_scaled(tmp_path):
    path = write_trace(
        tmp_path,
        row(timestamp=1500, output_length=2),
        row(timestamp=1000, output_length=1),
        row(timestamp=3000, output_length=3),
    )
    specs = load_trace(path, time_scale=2.0)
    assert [s.timestamp_s for s in specs] == [0.0, 1.0, 4.0]
    assert [s.max_tokens for s in specs] == [1, 2, 3]
    assert [s.timestamp_s for s in load_trace(path, max_requests=1)] == [0.0]


def test_seed_changes_the_text_and_only_the_text():
    base = load_trace(SAMPLE, max_requests=4)
    assert load_trace(SAMPLE, max_requests=4) == base
    other = load_trace(SAMPLE, max_requests=4, seed=1)
    assert [s.prompt for s in other] != [s.prompt for s in base]
    assert [(s.max_tokens, s.timestamp_s) for s in other] == [
        (s.max_tokens, s.timestamp_s) for s in base
    ]


def test_session_id_passes_through_and_blank_lines_are_skipped(tmp_path):
    path = write_trace(tmp_path, row(session_id="conv-1"), "", row(timestamp=5))
    first, second = load_trace(path)
    assert (first.session_id, second.session_id) == ("conv-1", None)
    assert [r.line_number for r in read_trace(path)] == [1, 3]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "line 3: not valid JSON"),
        ("[1, 2]", "line 3: expected a JSON object"),
        ('{"input_length": 5, "output_length": 5}', "line 3: missing 'timestamp'"),
        (row(timestamp="soon"), "line 3: 'timestamp' must be a number"),
        (row(timestamp=-1), "line 3: 'timestamp' must be a number"),
        (row(input_length=0), "line 3: 'input_length' must be a positive integer"),
        (row(output_length=True), "line 3: 'output_length' must be a positive integer"),
        (row(output_length=2.5), "line 3: 'output_length' must be a positive integer"),
        (row(hash_ids=None), "line 3: 'hash_ids' must be a list of integers"),
        (row(hash_ids=["a"]), "line 3: 'hash_ids' must be a list of integers"),
        (row(input_length=600, hash_ids=[1, 2, 3]), "line 3: 3 hash_ids .* only 2 blocks"),
        (row(session_id=7), "line 3: 'session_id' must be a string"),
    ],
)
def test_malformed_lines_are_reported_with_their_number(tmp_path, bad, message):
    path = write_trace(tmp_path, row(), row(timestamp=10), bad)
    with pytest.raises(ConfigError, match=message) as info:
        load_trace(path)
    assert info.value.field == "trace"
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"time_scale": 0}, "time_scale"),
        ({"time_scale": float("nan")}, "time_scale"),
        ({"block_tokens": 0}, "block_tokens"),
        ({"max_requests": 0}, "max_requests"),
    ],
)
def test_options_are_checked(options, field):
    with pytest.raises(ConfigError) as info:
        load_trace(SAMPLE, **options)
    assert info.value.field == field


def test_missing_and_empty_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_trace(tmp_path / "nowhere.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no requests"):
        load_trace(tmp_path / "empty.jsonl")
