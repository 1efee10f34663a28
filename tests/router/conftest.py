"""Router test fixtures: one in-process engine and one offline reference, per session.

Both run the built-in model with one torch thread and a small KV pool, so the whole
router suite stays light on the shared 2-core machines.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# Batch-invariant: HTTP answers are compared with the offline engine's, run in other batches.
ENGINE_OPTIONS = {
    "max_model_len": 256,
    "num_kv_blocks": 64,
    "num_threads": 1,
    "batch_invariant": True,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def engine_client(builtin_model_dir) -> Iterator:
    from pdserve.config import EngineConfig
    from tests.router.fakes import InProcessEngineClient

    client = InProcessEngineClient(builtin_model_dir, EngineConfig(**ENGINE_OPTIONS))
    yield client
    client.close()


@pytest.fixture(scope="session")
def reference_llm(builtin_model_dir):
    """The offline API on the same model and settings: what the HTTP answers must equal."""
    from pdserve import LLM

    return LLM(builtin_model_dir, **ENGINE_OPTIONS)
