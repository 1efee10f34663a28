"""A live `pdserve serve` for the bench tests: aggregated mode, one mixed worker with one
thread, on the built-in model. Session-scoped so every bench test module shares one
server (start-up is a few seconds; the load tests themselves are short)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serving.server import ServerProcess


@pytest.fixture(scope="session")
def live_server(builtin_model_dir) -> Iterator[ServerProcess]:
    server = ServerProcess("--mode", "aggregated", "--threads-per-worker", "1")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_model(live_server) -> str:
    from pdserve.bench.loadgen import fetch_model_id

    return fetch_model_id(live_server.url)
