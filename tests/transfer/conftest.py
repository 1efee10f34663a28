"""Fixtures of the transfer tests: one torch thread, a stand-in for /dev/shm, a wire."""

from __future__ import annotations

import pytest

from pdserve.transfer import shm
from tests.helpers import torch_threads
from tests.transfer.helpers import Wire


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    """shm pools live in a temporary folder standing in for /dev/shm."""
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    return tmp_path


@pytest.fixture
def wire():
    w = Wire()
    yield w
    w.close()
