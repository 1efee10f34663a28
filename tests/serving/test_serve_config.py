"""`pdserve serve` configuration: YAML, flags on top, defaults per mode, clear errors."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser
from pdserve.config import EngineConfig
from pdserve.control.worker_spec import read_spec
from pdserve.errors import ConfigError
from pdserve.serve import ServeConfig, WorkerProcesses


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
        ("kv_transport_security: none\n", "kv_transport_security"),
        ("engine: {max_num_seqs: 1.5}\n", "engine.max_num_seqs"),
        ("engine: {batch_invariant: 1}\n", "engine.batch_invariant"),
        ("engine: {batch_invariant: true, device: cuda}\n", "batch_invariant"),
        # per-role overrides: the same checks, named under their section
        ("engine_decode:\n  max_num_seq: 4\n", "engine_decode.max_num_seq"),
        ("engine_prefill:\n  max_num_seqs: lots\n", "engine_prefill.max_num_seqs"),
        ("engine_prefill:\n  max_num_seqs: 0\n", "engine_prefill.max_num_seqs"),
        ("engine_mixed: [1]\n", "engine_mixed"),
        ("engine_decode:\n  kv_tier_secret: abc\n", "engine_decode.kv_tier_secret"),
        (
            "engine_prefill:\n  batch_invariant: true\n  dtype: bfloat16\n",
            "engine_prefill.batch_invariant",
        ),
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


PER_ROLE_YAML = """
engine:
  max_num_seqs: 16
  block_size: 32
engine_prefill:
  max_num_seqs: 4
  max_num_batched_tokens: 1024
engine_decode:
  max_num_seqs: 128
  num_threads: 1
"""


def test_per_role_engine_overrides_merge_over_engine(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(PER_ROLE_YAML)
    config = parse("--config", str(path))
    prefill, decode, mixed = (config.engine_for(r) for r in ("prefill", "decode", "mixed"))
    assert (prefill.max_num_seqs, prefill.max_num_batched_tokens, prefill.block_size) == (
        4,
        1024,
        32,
    )
    assert (decode.max_num_seqs, decode.max_num_batched_tokens, decode.num_threads) == (
        128,
        None,
        1,
    )
    assert mixed == config.engine == EngineConfig(max_num_seqs=16, block_size=32)
    # A flag sets the value for every role, over the per-role YAML too.
    flagged = parse("--config", str(path), "--max-num-seqs", "8")
    assert {flagged.engine_for(r).max_num_seqs for r in ("prefill", "decode", "mixed")} == {8}
    assert flagged.engine_for("prefill").max_num_batched_tokens == 1024


def test_prefill_and_decode_workers_get_their_role_settings(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(PER_ROLE_YAML + "threads_per_worker: 2\n")
    config = parse("--config", str(path))
    workers = WorkerProcesses(config, tmp_path, "tcp://127.0.0.1:1", None)
    try:
        prefill, decode = workers.spec("prefill", "prefill-0"), workers.spec("decode", "decode-0")
        assert (prefill.engine.max_num_seqs, prefill.engine.max_num_batched_tokens) == (4, 1024)
        assert (decode.engine.max_num_seqs, decode.engine.max_num_batched_tokens) == (128, None)
        assert (prefill.engine.num_threads, decode.engine.num_threads) == (2, 1)
        assert workers._environment("decode")["OMP_NUM_THREADS"] == "1"
        # After a role switch the launcher records, a restart writes the new role's spec.
        workers.roles["prefill-0"] = "prefill"
        workers.set_role("prefill-0", "decode")
        argv = workers._command(workers.roles["prefill-0"], "prefill-0")
        restarted = read_spec(argv[-1])
        assert (restarted.role, restarted.engine.max_num_seqs) == ("decode", 128)
    finally:
        workers.stop()
    assert not workers.specs.path.exists()


def test_batch_invariant_from_yaml_or_flag(tmp_path):
    assert parse().engine.batch_invariant is False
    assert parse("--batch-invariant").engine.batch_invariant is True
    path = tmp_path / "serve.yaml"
    path.write_text("engine:\n  batch_invariant: true\n")
    assert parse("--config", str(path)).engine.batch_invariant is True
