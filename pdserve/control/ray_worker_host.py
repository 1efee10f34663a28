"""`WorkerHost`: the Ray actor that owns one pdserve worker process on its node.

The actor is small on purpose: it writes the worker's `WorkerSpec` and the cluster key into
a private folder on its node (0700; files 0600), starts `pdserve worker --spec FILE` as its
child, and reports when that child exits. The worker itself is the same process a local
launcher starts, so the data path does not change under Ray: its own ZeroMQ sockets, its
shared-memory KV pool, its torch threads (`OMP_NUM_THREADS` set here from its role's
engine settings), and the same `--spec` code path the local tests cover.

The child dies with the actor (PR_SET_PDEATHSIG = SIGKILL): an actor that Ray kills or
loses with its node leaves no worker behind that could keep writing KV after the router
has moved its requests (fencing). Its pool and folder are removed when the child exits
while the actor lives, or by `remove_leftovers` (a task the launcher runs on the node)
when the actor was killed first. Actors killed with the router actor that owned them
(`router_on_ray`: Ray ends an owner's actors with it) leave both behind with nobody to
remove them; each folder names its worker's pid, and every actor on that node sweeps
those whose process is gone, when it starts and every `SWEEP_PERIOD_S` after
(`sweep_orphans`): workers killed with a router that Ray restarts may die only after
their successors started.

The key arrives as an actor constructor argument wrapped in `Secret`, whose repr hides it:
Ray keeps constructor arguments in its GCS (see docs/architecture.md, "Ray") but lists
none of them in its actor table or logs.

Imports neither torch nor, at module import, Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from pdserve.control.worker_spec import decode_spec, encode_spec

WAIT_PERIOD_S = 0.1
SWEEP_PERIOD_S = 10.0


FOLDER_PREFIX = "pdserve-ray-"


class Secret:
    """A value that never prints: the cluster key (bytes), or the router actor's
    `ServeConfig` with its API keys, on its way to an actor."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"


class WorkerHost:
    def __init__(
        self,
        spec_json: bytes,
        key: Secret | None,
        env: dict[str, str],
        log_level: str,
        bind_loopback: bool,
        builtin_model: bool,
    ) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.folder = private_folder()
        spec = decode_spec(spec_json)
        key_path = write_private(self.folder / "cluster.key", key.value) if key else None
        spec = msgspec.structs.replace(
            spec,
            host="127.0.0.1" if bind_loopback else self.node_ip,
            advertise_host=None,
            cluster_key_file=str(key_path) if key_path else None,
            model_dir=_model_dir(spec.model_dir, builtin_model),
        )
        spec_path = write_private(self.folder / f"{spec.worker_id}.json", encode_spec(spec))
        command = [sys.executable, "-m", "pdserve.cli", "--log-level", log_level]
        self.proc = subprocess.Popen(
            [*command, "worker", "--spec", str(spec_path)],
            env={**os.environ, **env},
            preexec_fn=_die_with_parent,
        )
        mark_owner(self.folder, self.proc.pid)
        self.exit_code: int | None = None

    async def info(self) -> dict[str, object]:
        """Where this worker runs: answered once the actor is placed and its child started."""
        return {
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "pid": self.proc.pid,
            "folder": str(self.folder),
        }

    async def wait(self) -> int:
        """The child's exit code, once it exits (its pool and private folder removed)."""
        num_polls = 0
        while self.proc.poll() is None:
            await asyncio.sleep(WAIT_PERIOD_S)
            num_polls += 1
            if num_polls % round(SWEEP_PERIOD_S / WAIT_PERIOD_S) == 0:
                sweep_orphans()
        self._clean_up()
        return self.proc.returncode

    async def stop(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the child to exit (it was sent `Shutdown`), then
        SIGTERM, then SIGKILL."""
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.poll() is None:
                self.proc.send_signal(sig)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited(), timeout_s if sig is None else 3.0)
            if self.proc.poll() is not None:
                break
        self._clean_up()
        return self.proc.returncode

    async def _exited(self) -> None:
        while self.proc.poll() is None:
            await asyncio.sleep(WAIT_PERIOD_S)

    def _clean_up(self) -> None:
        remove_leftovers(self.proc.pid, str(self.folder))


def private_folder() -> Path:
    """A new folder (0700) for one actor's files on this node (after a sweep)."""
    sweep_orphans()
    return Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))


def sweep_orphans() -> None:
    """Remove the folders (and pools) on this node of actors' processes that are gone
    while nobody cleaned up after them (module docstring)."""
    for folder in Path(tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        try:
            pid = int((folder / "pid").read_text())
        except (OSError, ValueError):  # being set up, or another user's (0700)
            continue
        if not _is_alive(pid):
            remove_leftovers(pid, str(folder))


def mark_owner(folder: Path, pid: int) -> None:
    """Name the process whose death makes `folder` (and its pools) garbage."""
    (folder / "pid").write_text(str(pid))


def remove_leftovers(pid: int, folder: str) -> None:
    """Remove a dead worker's shared-memory KV pools and its private folder on this node.
    A pid that is alive here is someone else's process: its pools stay."""
    from pdserve.control.launcher import remove_shm_pools

    if not _is_alive(pid):
        remove_shm_pools([pid])
    if Path(folder).name.startswith(FOLDER_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is dead
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    return True


def write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _model_dir(model_dir: str, builtin_model: bool) -> str:
    """The built-in model is made on each node that needs it (seeded, so the same weights);
    a checkpoint folder must exist at the same path on every node."""
    if not builtin_model:
        return model_dir
    from pdserve.model.builtin import ensure_builtin_model

    return str(ensure_builtin_model(progress=False))


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the actor's process dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
