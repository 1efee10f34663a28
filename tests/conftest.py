"""Fixtures shared by every test folder. Keep this file small."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def builtin_model_dir() -> Path:
    """The built-in model folder, created once per machine (cached under PDSERVE_CACHE_DIR)."""
    from pdserve.model.builtin import ensure_builtin_model

    return ensure_builtin_model(progress=False)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` skip cleanly on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
