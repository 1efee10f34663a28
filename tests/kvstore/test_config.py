"""The KV tier settings: validation, and the same values through YAML, flags and worker specs."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.cli import build_parser, worker_config
from pdserve.config import EngineConfig
from pdserve.errors import ConfigError
from pdserve.serve import ServeConfig, WorkerProcesses


def test_tiers_are_off_by_default():
    config = EngineConfig()
    assert not config.has_kv_tiers
    assert (config.kv_host_cache_gib, config.kv_disk_cache_dir, config.kv_redis_url) == (
        0.0,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"kv_host_cache_gib": -1.0}, "kv_host_cache_gib"),
        ({"kv_disk_cache_gib": 0.0}, "kv_disk_cache_gib"),
        ({"kv_tier_dtype": "fp8"}, "kv_tier_dtype"),
        ({"kv_tier_admission": "lfu"}, "kv_tier_admission"),
        ({"kv_tier_admission_threshold": 0}, "kv_tier_admission_threshold"),
        ({"kv_disk_cache_dir": ""}, "kv_disk_cache_dir"),
        ({"kv_host_cache_gib": 1.0, "enable_prefix_caching": False}, "enable_prefix_caching"),
    ],
)
def test_invalid_settings_name_the_field(settings, field):
    with pytest.raises(ConfigError) as info:
        EngineConfig(**settings)
    assert info.value.field == field


def test_yaml_engine_section_and_worker_flags_carry_the_tiers(tmp_path):
    engine = {
        "kv_host_cache_gib": 0.5,
        "kv_disk_cache_dir": str(tmp_path),
        "kv_disk_cache_gib": 2.0,
        "kv_redis_url": "redis://127.0.0.1:6379/0",
        "kv_tier_dtype": "int8",
        "kv_tier_admission": "frequency",
        "kv_tier_admission_threshold": 3,
    }
    config = ServeConfig.from_dict({"engine": engine})
    assert config.engine.has_kv_tiers and config.engine.kv_tier_dtype == "int8"
    workers = WorkerProcesses(config, tmp_path, "tcp://x:1", None)
    try:
        argv = workers._command("mixed", "mixed-0")
        got = worker_config(build_parser().parse_args(argv[3:])).engine
    finally:
        workers.stop()
    assert dataclasses.replace(got, num_threads=None) == config.engine


def test_serve_flags_override_yaml(tmp_path):
    args = build_parser().parse_args(
        ["serve", "--kv-disk-cache-dir", str(tmp_path), "--kv-tier-dtype", "int8"]
    )
    config = ServeConfig.from_args(args)
    assert config.engine.kv_disk_cache_dir == str(tmp_path)
    assert config.engine.kv_tier_dtype == "int8"


def test_admission_flags(tmp_path):
    args = build_parser().parse_args(
        ["serve", "--kv-tier-admission", "frequency", "--kv-tier-admission-threshold", "4"]
    )
    engine = ServeConfig.from_args(args).engine
    assert (engine.kv_tier_admission, engine.kv_tier_admission_threshold) == ("frequency", 4)
    assert EngineConfig().kv_tier_admission == "all"
