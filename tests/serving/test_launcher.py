"""`pdserve serve` as an operator sees it: clean shutdown, no orphans, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from pdserve.control.worker_spec import read_spec
from pdserve.ipc.security import load_key_file
from pdserve.transfer import SHM_DIR, SHM_PREFIX
from tests.serving.server import ServerProcess


def shm_files(pids: list[int]) -> list[str]:
    return sorted(p.name for pid in pids for p in SHM_DIR.glob(f"{SHM_PREFIX}*-{pid}"))


def spec_file_of(pid: int) -> Path:
    """The `--spec` file in a worker's command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--spec") + 1].decode())


def key_file_of(pid: int) -> Path:
    """The cluster key path in a worker's spec."""
    return Path(read_spec(spec_file_of(pid)).cluster_key_file)


def test_sigterm_stops_everything_and_removes_shared_pools(builtin_model_dir):
    server = ServerProcess("--mode", "disaggregated", "--threads-per-worker", "1")
    pids = server.worker_pids()
    assert len(pids) == 2
    assert len(shm_files(pids)) == 2  # every role's pool (a prefill worker may become decode)
    for path in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        if any(path.name.endswith(f"-{pid}") for pid in pids):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # CURVE: a fresh key, 0600 in a private folder; children get its path, never the key.
    key_file = key_file_of(pids[0])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    secret = load_key_file(key_file).secret
    for pid in pids:
        assert key_file_of(pid) == key_file
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert secret not in Path(f"/proc/{pid}/environ").read_bytes()
        assert secret not in spec_file_of(pid).read_bytes()
        assert stat.S_IMODE(spec_file_of(pid).stat().st_mode) == 0o600
        assert stat.S_IMODE(spec_file_of(pid).parent.stat().st_mode) == 0o700
    spec_folder = spec_file_of(pids[0]).parent
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    assert server.stop() == 0
    assert server.wait_gone(pids) == []
    assert shm_files(pids) == []
    assert not key_file.parent.exists()  # removed at exit
    assert not spec_folder.exists()
    assert secret.decode() not in "".join(server.lines)


def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/ready").status_code == 200:
            return
        time.sleep(0.2)
    pytest.fail("server did not become ready again")


def test_worker_crash_request_waits_for_the_restarted_worker(builtin_model_dir):
    """The only worker dies mid-stream: its request waits (migration_wait_s) for the
    restarted worker and resumes there, exactly where it stopped (batch-invariant: the
    resumed stream re-prefills prompt + streamed tokens, and only this mode makes that
    give the decode step's logits bit for bit on every CPU)."""
    server = ServerProcess("--mode", "aggregated", "--threads-per-worker", "1", "--batch-invariant")
    try:
        (pid,) = server.worker_pids()
        body = {"prompt": "count", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        expected = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        events = []
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=120
        ) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 2:
                    os.kill(pid, signal.SIGKILL)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks[-1]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == expected["choices"][0]["text"]
        _wait_ready(server.url)
        (new_pid,) = server.worker_pids()
        assert new_pid != pid
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        assert server.stop() == 0


def test_router_with_workers_started_separately(builtin_model_dir, tmp_path):
    """`pdserve router` + `pdserve worker` processes (how a multi-machine deployment runs,
    here on one host) sharing a key from `pdserve keys`: ready once both joined, serves,
    and stops without stopping them."""
    keys = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "keys", "--out", str(tmp_path / "keys")],
        capture_output=True,
        text=True,
    )
    assert keys.returncode == 0, keys.stderr
    key_file = tmp_path / "keys" / "cluster.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_key_file(key_file).secret.decode() not in keys.stdout
    server = ServerProcess(
        "--mode",
        "disaggregated",
        "--expect-workers",
        "2",
        "--cluster-key",
        str(key_file),
        command="router",
        wait=False,
    )
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pdserve.cli",
                "worker",
                "--role",
                role,
                "--router",
                server.router_addr,
                "--worker-id",
                f"ext-{role}",
                "--threads",
                "1",
                "--cluster-key",
                str(key_file),
            ]
        )
        for role in ("prefill", "decode")
    ]
    try:
        server.wait_ready(120)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x " * 300, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        roles = {w["role"] for w in httpx.get(server.url + "/ready").json()["workers"]}
        assert roles == {"prefill", "decode"}
        assert server.stop() == 0
        assert all(w.poll() is None for w in workers)  # external workers keep running
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            assert w.wait(15) == 0
