"""The rendered overlays, once per test run (tests/deploy/manifests.py)."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import render_overlays


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return render_overlays(tmp_path_factory.mktemp("deploy"))
