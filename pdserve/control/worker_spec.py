"""`WorkerSpec`: everything a worker process needs, as one typed object.

A launcher builds a spec per worker (its id, role, the router's address, the role's full
`EngineConfig`, ...) and hands it to the child as a msgspec-encoded JSON file in a private
folder the launcher owns (`SpecFolder`: 0700, files 0600); `pdserve worker --spec FILE`
reads it back. No engine setting travels as a command-line flag, so a field added to
`EngineConfig` reaches workers with no other change (tests/control/test_worker_spec.py
walks every field).

Decoding is strict: an unknown key, at the top or inside `engine`, or a value of the wrong
type raises `ConfigError` naming it; `EngineConfig`'s own checks run too. The spec never
carries a secret: the cluster key travels as a file path, and `kv_tier_secret` (derived
from that key by the worker) is left out.

Torch-free: the router side builds specs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from pdserve.config import EngineConfig
from pdserve.errors import ConfigError

# Set by the worker from the cluster key, never written to a file.
SECRET_ENGINE_FIELDS = frozenset({"kv_tier_secret"})


class WorkerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    worker_id: str
    role: str
    model_dir: str
    router_addr: str  # the router's worker socket, tcp://host:port
    engine: EngineConfig
    host: str = "127.0.0.1"  # where the worker's sockets bind
    advertise_host: str | None = None  # how others reach it when `host` is a wildcard
    backends: tuple[str, ...] = ("shm", "tcp")
    kv_layerwise: bool = True
    cluster_key_file: str | None = None  # None: plain ZeroMQ (--insecure-no-curve)
    kv_transport_security: str = "encrypt"  # or "mac" (ipc/security.py, KVMac)


def encode_spec(spec: WorkerSpec) -> bytes:
    data = msgspec.to_builtins(spec)
    for name in SECRET_ENGINE_FIELDS:
        data["engine"].pop(name, None)
    return msgspec.json.encode(data)


def decode_spec(raw: bytes) -> WorkerSpec:
    """The spec in `raw`; `ConfigError` naming the first bad key or value."""
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise ConfigError("spec", f"not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("engine", {}), dict):
        raise ConfigError("spec", "expected a JSON object with an `engine` object")
    _check_keys(data, set(WorkerSpec.__struct_fields__), "")
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)} - SECRET_ENGINE_FIELDS
    _check_keys(data.get("engine", {}), engine_fields, "engine.")
    try:
        return msgspec.convert(data, WorkerSpec)
    except msgspec.ValidationError as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):  # EngineConfig.__post_init__
            raise ConfigError(f"engine.{cause.field}", str(cause).split(": ", 1)[-1]) from None
        raise ConfigError("spec", str(e).replace("$.", "")) from None


def _check_keys(data: dict[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown; known: {sorted(known)}")


def read_spec(path: str | os.PathLike[str]) -> WorkerSpec:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError("spec", f"cannot read {path}: {e.strerror}") from None
    return decode_spec(raw)


class SpecFolder:
    """A private folder (0700) of spec files (0600), removed by `remove`."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pdserve-specs-"))  # mkdtemp: mode 0700

    def write(self, spec: WorkerSpec) -> Path:
        """Write (or replace) the spec file of `spec.worker_id`; returns its path."""
        path = self.path / f"{spec.worker_id}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(encode_spec(spec))
        os.replace(tmp, path)  # a child never reads a half-written file
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
