"""Gateway settings through `pdserve serve`: YAML keys and flags reach `GatewayConfig`;
bad values, an empty key among them, are configuration errors naming the setting."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser
from pdserve.errors import ConfigError
from pdserve.router.gateway import GatewayConfig
from pdserve.serve import ServeConfig


def parse(*argv: str) -> ServeConfig:
    return ServeConfig.from_args(build_parser().parse_args(["serve", *argv]))


def test_yaml_then_flags_reach_the_gateway(tmp_path, monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    path = tmp_path / "serve.yaml"
    path.write_text("admission_ttft_ms: 1500\nmax_queued_requests: 64\nmax_n: 8\n")
    config = parse(
        "--config",
        str(path),
        "--max-n",
        "4",
        "--api-keys",
        "keys.yaml",
        "--protect-probes",
        "--request-timeout-s",
        "30",
        "--limit-concurrency",
        "500",
    )
    gateway = config.gateway()
    assert gateway == GatewayConfig(
        admission_ttft_ms=1500.0,
        max_queued_requests=64,
        max_n=4,
        api_keys_file="keys.yaml",
        protect_probes=True,
        request_timeout_s=30.0,
        limit_concurrency=500,
    )


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"api_key": ""}, "api_key"),
        ({"api_key": "  "}, "api_key"),
        ({"api_keys": ""}, "api_keys"),
        ({"protect_probes": True}, "protect_probes"),
        ({"max_n": 0}, "max_n"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"admission_ttft_ms": 0}, "admission_ttft_ms"),
        ({"request_timeout_s": float("inf")}, "request_timeout_s"),
        ({"max_queued_requests": 0}, "max_queued_requests"),
        ({"limit_concurrency": 0}, "limit_concurrency"),
        ({"admission_ttft_ms": "fast"}, "admission_ttft_ms"),
    ],
)
def test_bad_gateway_settings_are_config_errors(settings, field):
    with pytest.raises(ConfigError) as info:
        ServeConfig.from_dict(settings)
    assert info.value.field == field
