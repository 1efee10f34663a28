"""`pdserve serve` configuration: YAML, flags on top, defaults per mode, clear errors."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser
from pdserve.config import EngineConfig
from pdserve.errors import ConfigError
from pdserve.serve import ServeConfig, engine_flags


def parse(*argv: str) -> ServeConfig:
    return ServeConfig.from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults_are_one_prefill_one_decode_auto(monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    config = parse()
    assert (config.mode, config.host, config.port, config.api_key) == (
        "auto",
        "127.0.0.1",
        8000,
        None,
    )
    assert config.worker_counts() == {"prefill": 1, "decode": 1, "mixed": 0}
    assert parse("--mode", "aggregated").worker_counts() == {"prefill": 0, "decode": 0, "mixed": 1}


def test_threads_split_between_workers(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert ServeConfig().threads() == 4
    assert ServeConfig(mode="aggregated").threads() == 8
    assert ServeConfig(prefill_workers=3, decode_workers=5).threads() == 1
    assert ServeConfig(threads_per_worker=3).threads() == 3


def test_yaml_then_flags_win(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    path = tmp_path / "serve.yaml"
    path.write_text(
        "mode: disaggregated\nport: 9000\nprefill_workers: 2\n"
        "engine:\n  max_num_seqs: 8\n  block_size: 32\n"
    )
    config = parse(
        "--config", str(path), "--port", "9100", "--max-num-seqs", "4", "--no-kv-layerwise"
    )
    assert (config.mode, config.port, config.prefill_workers) == ("disaggregated", 9100, 2)
    assert (config.engine.max_num_seqs, config.engine.block_size) == (4, 32)
    assert config.kv_layerwise is False
    assert config.api_key == "from-env"
    assert parse("--api-key", "flag").api_key == "flag"


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("modee: auto\n", "modee"),
        ("engine:\n  max_num_seq: 4\n", "engine.max_num_seq"),
        ("engine: 5\n", "engine"),
        ("mode: fastest\n", "mode"),
        ("kv_backend: rdma\n", "kv_backend"),
        ("port: 70000\n", "port"),
        ("prefill_workers: 0\ndecode_workers: 0\n", "workers"),
        ("- a list\n", "config"),
        ("engine: {dtype: float8}\n", "dtype"),
        ("port: eighty\n", "port"),
        ("kv_layerwise: 3\n", "kv_layerwise"),
        ("engine: {max_num_seqs: 1.5}\n", "engine.max_num_seqs"),
        ("engine: {batch_invariant: 1}\n", "engine.batch_invariant"),
        ("engine: {batch_invariant: true, device: cuda}\n", "batch_invariant"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, yaml_text, field):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        parse("--config", str(path))
    assert e.value.field == field


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse("--config", str(tmp_path / "nope.yaml"))


def test_engine_flags_recreate_the_engine_config():
    engine = EngineConfig(
        max_num_batched_tokens=64,
        block_size=32,
        enable_prefix_caching=False,
        max_model_len=1024,
        seed=3,
        batch_invariant=True,
    )
    args = build_parser().parse_args(
        ["worker", "--role", "decode", "--router", "tcp://x:1", *engine_flags(engine)]
    )
    from pdserve.cli import _engine_kwargs

    assert EngineConfig(**{**_engine_kwargs(args), "num_threads": None}) == engine


def test_batch_invariant_from_yaml_or_flag(tmp_path):
    assert parse().engine.batch_invariant is False
    assert parse("--batch-invariant").engine.batch_invariant is True
    path = tmp_path / "serve.yaml"
    path.write_text("engine:\n  batch_invariant: true\n")
    assert parse("--config", str(path)).engine.batch_invariant is True
