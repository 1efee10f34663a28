"""A worker death loses no request: kill -9 of a decode, prefill or mixed worker under
streaming load, a hung worker (kill -STOP), a drain, and repeated crashes, against a real
`pdserve serve`. Every request must complete with exactly the text and token count of an
undisturbed run: nothing lost, duplicated or changed (control/migration.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx2 as httpx
import pytest

from pdserve.worker.worker import DRAIN_GRACE_S
from tests.serving.faults import (
    ADMIN_KEY,
    admin,
    counter,
    freeze_busiest,
    prompts,
    run_streams,
    wait_for,
    worker_pid,
    workers,
)
from tests.serving.server import ServerProcess

MAX_TOKENS = 48
# Batch-invariant mode: a resumed request's recomputed logits are bitwise the decode
# step's, so "exactly the undisturbed tokens" holds by construction on every CPU.
COMMON = [
    "--threads-per-worker",
    "1",
    "--admin-key",
    ADMIN_KEY,
    "--max-num-seqs",
    "8",
    "--batch-invariant",
]


def reference(server: ServerProcess, texts: list[str], **params) -> list[str]:
    """The undisturbed outputs, one request at a time."""
    outputs = []
    for text in texts:
        streams, threads = run_streams(server.url, [text], MAX_TOKENS, **params)
        threads[0].join()
        assert streams[0].error is None, streams[0].error
        outputs.append(streams[0].text)
    return outputs


def assert_all_exact(streams, expected: list[str], n: int = 1) -> None:
    for stream, text in zip(streams, expected, strict=True):
        assert stream.error is None, stream.error
        assert stream.status_code == 200
        assert stream.completion_tokens == n * MAX_TOKENS
        assert stream.finish_reason == "length"
        assert stream.text == text


def kill_under_load(server, role: str, texts: list[str], when, **params) -> tuple[list, str]:
    """Start the streams; once `when(streams)` holds, kill -9 the worker of `role` holding
    the most requests, frozen first (freeze_busiest) so that the kill must move some.
    Returns (streams, victim)."""
    streams, threads = run_streams(server.url, texts, MAX_TOKENS, **params)
    victim = []

    def frozen_holding() -> bool:
        if not when(streams):
            return False
        pids = {w: worker_pid(server, w) for w, i in workers(server).items() if i["role"] == role}
        worker = freeze_busiest(server, pids)
        if worker is not None:
            os.kill(pids[worker], signal.SIGKILL)
            victim.append(worker)
        return worker is not None

    wait_for(frozen_holding, what="the streams to reach the kill point")
    for t in threads:
        t.join(120)
    return streams, victim[0]


def wait_busy(server: ServerProcess, role: str, streams) -> str:
    """Once every stream is decoding: the worker of `role` holding the most of them."""
    found = []

    def ready() -> bool:
        worker = busiest(server, role) if all(len(s.chunks) >= 2 for s in streams) else None
        found[:] = [worker] if worker else []
        return bool(found)

    wait_for(ready, what=f"a busy {role} worker")
    return found[0]


def busiest(server: ServerProcess, role: str) -> str | None:
    """The worker of `role` holding the most requests now (None if none holds any): the
    routing policy decides where requests go, so the test kills where they are."""
    held = {w: i["num_requests"] for w, i in workers(server).items() if i["role"] == role}
    worker = max(held, key=held.get, default=None)
    return worker if worker is not None and held[worker] > 0 else None


@pytest.mark.parametrize(
    ("layout", "role", "moment"),
    [
        (["--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "2"], "decode", "decoding"),
        (["--mode", "disaggregated", "--prefill-workers", "2", "--decode-workers", "1"], "prefill", "arrived"),
        (["--mode", "aggregated", "--mixed-workers", "2"], "mixed", "decoding"),
    ],
    ids=["decode", "prefill", "mixed"],
)  # fmt: skip
def test_kill_9_loses_no_request(builtin_model_dir, tmp_path, layout, role, moment):
    config = []
    if moment == "arrived":
        # No prefix cache: the reference run would leave every prompt cached and the loaded
        # run's prefills would then take a moment (or be skipped), too short to catch.
        (tmp_path / "serve.yaml").write_text("engine:\n  enable_prefix_caching: false\n")
        config = ["--config", str(tmp_path / "serve.yaml")]
    server = ServerProcess(*layout, *COMMON, *config)
    try:
        texts = prompts(8, words=150 if moment == "arrived" else 30)
        expected = reference(server, texts)
        before = counter(server, "pdserve:request_migrations_total")

        def when(streams) -> bool:
            if moment == "decoding" and not all(len(s.chunks) >= 3 for s in streams):
                return False  # every request decoding
            # "arrived": dispatched to a prefill worker, no first token yet
            return busiest(server, role) is not None

        streams, victim = kill_under_load(server, role, texts, when)
        assert_all_exact(streams, expected)
        assert counter(server, "pdserve:request_migrations_total") > before
        wait_for(lambda: workers(server)[victim]["state"] == "serving", 60, "the restart")
    finally:
        assert server.stop() == 0


def test_a_hung_worker_is_fenced_killed_and_its_requests_move(builtin_model_dir):
    """kill -STOP: the heartbeat stops with the loop; within the lease the router declares
    the worker dead, moves its requests and has the launcher kill it (fencing)."""
    server = ServerProcess(
        "--mode", "aggregated", "--mixed-workers", "2", "--worker-lease-s", "2", *COMMON
    )
    try:
        texts = prompts(6, words=30)
        expected = reference(server, texts)
        hung = worker_pid(server, "mixed-0")
        streams, threads = run_streams(server.url, texts, MAX_TOKENS)
        wait_for(lambda: all(len(s.chunks) >= 3 for s in streams), what="decoding")
        os.kill(hung, signal.SIGSTOP)
        for t in threads:
            t.join(120)
        assert_all_exact(streams, expected)
        wait_for(lambda: not os.path.exists(f"/proc/{hung}") or _is_dead(hung), 30, "the kill")
        wait_for(lambda: workers(server)["mixed-0"]["state"] == "serving", 60, "the restart")
        assert worker_pid(server, "mixed-0") != hung
    finally:
        assert server.stop() == 0


def _is_dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] in "ZX"
    except OSError:
        return True


def test_drain_through_the_admin_api_moves_requests_exactly(builtin_model_dir):
    server = ServerProcess("--mode", "aggregated", "--mixed-workers", "2", *COMMON)
    try:
        url = server.url + "/admin/workers/mixed-0/drain"
        assert httpx.post(url).status_code == 401
        wrong = httpx.post(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "invalid_admin_key"
        assert admin(server, "POST", "/admin/workers/nobody/drain").status_code == 404
        texts = prompts(6, words=30)
        expected = reference(server, texts)
        streams, threads = run_streams(server.url, texts, MAX_TOKENS)
        target = wait_busy(server, "mixed", streams)
        r = admin(server, "POST", f"/admin/workers/{target}/drain", json={"migrate": True})
        assert r.status_code == 200 and r.json()["status"] == "drained"
        assert r.json()["num_migrated"] > 0
        drained = workers(server)[target]
        assert (drained["state"], drained["num_requests"]) == ("draining", 0)
        for t in threads:
            t.join(120)
        assert_all_exact(streams, expected)
        assert (
            admin(server, "POST", f"/admin/workers/{target}/resume").json()["status"] == "serving"
        )
        assert workers(server)[target]["state"] == "serving"
    finally:
        assert server.stop() == 0


def test_sigterm_drains_a_worker_before_it_exits(builtin_model_dir):
    server = ServerProcess("--mode", "aggregated", "--mixed-workers", "2", *COMMON)
    try:
        texts = prompts(6, words=30)
        expected = reference(server, texts)
        streams, threads = run_streams(server.url, texts, MAX_TOKENS)
        target = wait_busy(server, "mixed", streams)
        pid = worker_pid(server, target)
        os.kill(pid, signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert_all_exact(streams, expected)
        wait_for(lambda: _is_dead(pid), 30, "the drained worker to exit")
        wait_for(lambda: any(f"{target} exited" in line for line in server.lines), 60, "the log")
        exits = [line for line in server.lines if f"{target} exited" in line]
        assert f"{target} exited with code 0" in exits[0], server.lines
    finally:
        assert server.stop() == 0


def test_a_worker_that_keeps_crashing_keeps_coming_back(builtin_model_dir):
    """No restart cap: /ready recovers every time (backoff 0.5, 1, 2, 4 s)."""
    server = ServerProcess("--mode", "aggregated", *COMMON)
    try:
        pids = []
        for _ in range(4):
            wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200, 60, "ready")
            pid = worker_pid(server, "mixed-0")
            assert pid not in pids
            pids.append(pid)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: httpx.get(server.url + "/ready").status_code == 503, 10, "not ready")
        wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200, 60, "ready")
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        assert server.stop() == 0


def test_seeded_samples_survive_migration_token_exact(builtin_model_dir):
    """Seeded random sampling (n = 2) resumes on another worker with the very tokens an
    undisturbed run draws: the (seed, index) stream continues at the next index, and in
    batch-invariant mode the recomputed logits are bitwise the decoded ones."""
    layout = ["--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "2"]
    server = ServerProcess(*layout, *COMMON)
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "n": 2}
    try:
        texts = prompts(4, words=30)
        expected = reference(server, texts, **seeded)
        before = counter(server, "pdserve:request_migrations_total")

        def when(streams) -> bool:
            return (
                all(len(s.chunks) >= 4 for s in streams) and busiest(server, "decode") is not None
            )

        streams, _ = kill_under_load(server, "decode", texts, when, **seeded)
        assert_all_exact(streams, expected, n=2)
        assert counter(server, "pdserve:request_migrations_total") > before
    finally:
        assert server.stop() == 0


def test_a_restarted_router_stops_the_requests_nobody_reads(builtin_model_dir, tmp_path):
    """The router dies mid-stream; a new one on the same port finds the worker still
    decoding for a client that is gone, fences it (it drops the orphan and rejoins) and
    serves with it: no decoding to max_tokens for nobody."""
    keys = [sys.executable, "-m", "pdserve.cli", "keys", "--out", str(tmp_path / "keys")]
    subprocess.run(keys, check=True, capture_output=True)
    key = ["--cluster-key", str(tmp_path / "keys" / "cluster.key")]
    router = ServerProcess(
        "--mode", "aggregated", "--expect-workers", "1", *key, command="router", wait=False
    )  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "worker", "--role", "mixed", "--router",
         router.router_addr, "--worker-id", "ext-0", "--threads", "1", *key]
    )  # fmt: skip
    try:
        router.wait_ready(120)
        streams, threads = run_streams(router.url, ["orphan " * 20], 1500)
        wait_for(lambda: len(streams[0].chunks) >= 2, what="the stream")
        router.proc.kill()
        router.proc.wait()
        again = ServerProcess(
            "--mode", "aggregated", "--expect-workers", "1", *key, command="router",
            router_port=router.router_port,
        )  # fmt: skip
        try:

            def num_running() -> int:
                ready = httpx.get(again.url + "/ready").json()
                return sum(w["num_running"] + w["num_waiting"] for w in ready["workers"])

            wait_for(lambda: num_running() == 0, 40, "the orphan to be dropped")
            assert worker.poll() is None  # fenced, not killed: it rejoined
            wait_for(lambda: httpx.get(again.url + "/ready").status_code == 200, 30, "ready")
            r = httpx.post(again.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        finally:
            again.stop()
    finally:
        worker.terminate()  # drains: exits once idle, or DRAIN_GRACE_S at the latest
        worker.wait(DRAIN_GRACE_S + 30)
        for t in threads:
            t.join(5)
