"""The malloc thresholds (`cpu_malloc`) apply once on glibc and can be turned off."""

from __future__ import annotations

import platform

import pytest

from pdserve.model import cpu_malloc


@pytest.fixture(autouse=True)
def fresh_cache():
    cpu_malloc.tune_malloc.cache_clear()
    yield
    cpu_malloc.tune_malloc.cache_clear()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_applies_on_glibc():
    assert cpu_malloc.tune_malloc() is True
    assert cpu_malloc.tune_malloc() is True  # idempotent


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PDSERVE_MALLOC_TUNING", "0")
    assert cpu_malloc.tune_malloc() is False
