"""Start a real `pdserve serve` for tests, and find what it started.

`ServerProcess` runs the launcher as a subprocess on free ports, waits for its
"pdserve ready" line, and on `stop()` sends SIGTERM and waits. Worker processes are found
through /proc by the router address in their command line (the launcher passes it to
each worker), so tests can assert that none outlives the launcher.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def pids_with_arg(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


class ServerProcess:
    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 180,
        command: str = "serve",
        wait: bool = True,
        router_port: int | None = None,
    ):
        self.port = free_port()
        self.router_port = router_port or free_port()
        self.router_addr = f"tcp://127.0.0.1:{self.router_port}"
        cmd = [
            sys.executable,
            "-m",
            "pdserve.cli",
            command,
            "--port",
            str(self.port),
            "--router-port",
            str(self.router_port),
            "--log-level",
            "WARNING",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
        if not self._ready.is_set():
            self.stop()
            raise RuntimeError("server not ready:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("pdserve ready"):
                self._ready.set()

    def worker_pids(self, worker_id: str | None = None) -> list[int]:
        """Workers this server launched (each `worker --spec DIR/<id>.json`, a child of it),
        or only `worker_id`'s; plus workers started by hand with `--router` its address."""
        spec = f"/{worker_id}.json" if worker_id else ".json"
        children = [p for p in pids_with_arg(" worker --spec ") if _parent(p) == self.proc.pid]
        children = [p for p in children if spec in _cmdline(p)]
        by_hand = f"--worker-id {worker_id} " if worker_id else ""
        return children + pids_with_arg(f"{by_hand}--router {self.router_addr}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def wait_gone(self, pids: list[int], timeout: float = 10) -> list[int]:
        deadline = time.monotonic() + timeout
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.1)
        return alive


def _is_zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
