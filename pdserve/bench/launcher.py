"""Start a `pdserve serve` on this machine for a benchmark, and make sure it is gone after.

`ServeProcess(settings)` writes the settings (a `ServeConfig` mapping) to a temporary
YAML file and runs `python -m pdserve.cli serve --config <tmp> --port <free>
--router-port <free>`, with its output (the launcher's and every worker's) teed to a log
file and kept in memory. `wait_ready()` returns once the "pdserve ready" line appears,
or False when the process exits or the time runs out. `stop()` sends SIGTERM, waits,
and then checks that every process the server had started is gone; stragglers are
killed by pid and returned, so a caller can report them.

Why this way: a sweep launches many servers in a row on the same cores, and one orphaned
worker would skew every measurement after it. The launcher's own shutdown already stops
its workers; this class does not trust that blindly. It records the server's
descendants (pid and start time, read from /proc, so a reused pid is never mistaken for
one of ours) while the server runs, and checks them after it exits — a child reparented
to init after its launcher died is still found. Linux only (/proc), like `pdserve serve`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

READY_LINE = "pdserve ready"
LOG_TAIL_LINES = 40

ProcId = tuple[int, int]  # (pid, start time in clock ticks since boot): unique per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(
        self,
        settings: dict[str, Any],
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        import yaml

        self.port = free_port()
        self.router_port = free_port()
        host = settings.get("host", "127.0.0.1")
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"
        fd, name = tempfile.mkstemp(prefix="pdserve-sweep-", suffix=".yaml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(settings, f, sort_keys=False)
        self.config_path = Path(name)
        self.lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8") if log_path else None  # noqa: SIM115
        self._ready = threading.Event()
        self._seen: set[ProcId] = set()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--config",
            str(self.config_path),
            "--port",
            str(self.port),
            "--router-port",
            str(self.router_port),
        ]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._log:
                self._log.write(line)
                self._log.flush()
            if line.startswith(READY_LINE):
                self._ready.set()

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            self._remember_descendants()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
        self._remember_descendants()
        return True

    def start_error(self, timeout_s: float) -> str | None:
        """`wait_ready`, but None once ready, or why not: exited (with its code) or too slow."""
        if self.wait_ready(timeout_s):
            return None
        code = self.proc.poll()
        how = f"exited with code {code}" if code is not None else "was not ready in time"
        return f"server {how} (log: {self.log_path})"

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> list[str]:
        self._reader.join(timeout=1)  # after an exit, let the last lines arrive
        return list(self.lines)

    def pids(self) -> list[int]:
        """The server and every process it started that is still alive."""
        self._remember_descendants()
        return sorted(p[0] for p in self._seen if _is_alive(p))

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """SIGTERM, wait; then kill whatever the server started that outlived it.
        Returns the pids that had to be killed (none when shutdown was clean)."""
        self._remember_descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        stragglers = _wait_gone(self._seen, 10.0)
        for pid, _ in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log_tail()
        if self._log:
            self._log.close()
        self.config_path.unlink(missing_ok=True)
        return sorted(pid for pid, _ in stragglers)

    def _remember_descendants(self) -> None:
        self._seen |= descendants(self.proc.pid)


def descendants(root_pid: int) -> set[ProcId]:
    """`root_pid` and every live process below it, from /proc."""
    children: dict[int, list[ProcId]] = {}
    root: ProcId | None = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None:
            continue
        ppid, start = stat
        children.setdefault(ppid, []).append((int(entry.name), start))
        if int(entry.name) == root_pid:
            root = (root_pid, start)
    if root is None:
        return set()
    found, todo = {root}, [root_pid]
    while todo:
        for proc in children.get(todo.pop(), []):
            found.add(proc)
            todo.append(proc[0])
    return found


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live, non-zombie process; None otherwise."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # NOTE: the command name (field 2) may hold spaces and parentheses; split after it.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _is_alive(proc: ProcId) -> bool:
    stat = _stat(proc[0])
    return stat is not None and stat[1] == proc[1]


def _wait_gone(procs: set[ProcId], timeout_s: float) -> list[ProcId]:
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _is_alive(p)]
    return alive
