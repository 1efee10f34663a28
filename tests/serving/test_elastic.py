"""The cluster's shape changes at runtime without a request failing or changing a token:
role switches under streaming load (same process, pool and prefix cache kept), scale out
and scale in through the admin API (router/elastic.py)."""

from __future__ import annotations

import os

import httpx2 as httpx

from tests.serving.faults import admin, counter, prompts, run_streams, wait_for, worker_pid, workers
from tests.serving.server import ServerProcess
from tests.serving.test_fault_tolerance import COMMON, MAX_TOKENS, assert_all_exact, reference


def assert_pools_idle(server: ServerProcess) -> None:
    """Every block of every worker free again: nothing leaked by the switches."""

    def idle() -> bool:
        return all(w["num_free_blocks"] == w["num_blocks"] for w in workers(server).values())

    wait_for(idle, 15, "every pool to be free")


def test_role_switches_under_load_keep_every_token(builtin_model_dir):
    server = ServerProcess(
        "--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "1", *COMMON
    )
    try:
        texts = prompts(6, words=40)
        expected = reference(server, texts)
        pid = worker_pid(server, "prefill-0")
        assert (
            httpx.post(
                server.url + "/admin/workers/prefill-0/role", json={"role": "mixed"}
            ).status_code
            == 401
        )
        streams, threads = run_streams(server.url, texts, MAX_TOKENS)
        wait_for(lambda: all(len(s.chunks) >= 2 for s in streams), what="decoding")
        r = admin(server, "POST", "/admin/workers/decode-0/role", json={"role": "mixed"})
        assert r.status_code == 200, r.text
        assert (r.json()["old_role"], r.json()["new_role"]) == ("decode", "mixed")
        assert r.json()["switch_seconds"] < 10  # a bound, not a speed test (hosts vary)
        r = admin(server, "POST", "/admin/workers/prefill-0/role", json={"role": "decode"})
        assert r.status_code == 200, r.text
        for t in threads:
            t.join(120)
        assert_all_exact(streams, expected)
        roles = {w: info["role"] for w, info in workers(server).items()}
        assert roles == {"prefill-0": "decode", "decode-0": "mixed"}
        assert worker_pid(server, "prefill-0") == pid  # switched in place, not restarted
        assert counter(server, "pdserve:role_switches_total") == 2
        assert (
            'pdserve:worker_role{model_name="pdserve-tiny-llama-v1",role="mixed",worker="decode-0"} 1.0'
            in httpx.get(server.url + "/metrics").text
        )
        # The new layout serves, token-exact, and leaks nothing.
        streams, threads = run_streams(server.url, texts, MAX_TOKENS)
        for t in threads:
            t.join(120)
        assert_all_exact(streams, expected)
        assert_pools_idle(server)
        bad = admin(server, "POST", "/admin/workers/decode-0/role", json={"role": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"
    finally:
        assert server.stop() == 0


def test_scale_out_and_in_through_the_admin_api(builtin_model_dir):
    # round_robin: the new worker surely gets half the requests it is removed under.
    server = ServerProcess("--mode", "aggregated", "--routing-policy", "round_robin", *COMMON)
    try:
        r = admin(server, "POST", "/admin/workers", json={"role": "mixed"})
        assert r.status_code == 201, r.text
        added = r.json()["worker_id"]
        assert added == "mixed-1" and workers(server)[added]["state"] == "serving"
        texts = prompts(4, words=30)
        expected = reference(server, texts)
        pid = worker_pid(server, added)
        streams, threads = run_streams(server.url, texts, MAX_TOKENS)
        wait_for(lambda: workers(server)[added]["num_requests"] > 0, what="work on the new worker")
        r = admin(server, "DELETE", f"/admin/workers/{added}")
        assert r.status_code == 200 and r.json()["status"] == "removed"
        for t in threads:
            t.join(120)
        assert_all_exact(streams, expected)
        assert added not in workers(server)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 15, "the removed worker to exit")
        assert httpx.get(server.url + "/ready").status_code == 200
        assert admin(server, "DELETE", "/admin/workers/nobody").status_code == 404
    finally:
        assert server.stop() == 0


def serves_exactly(server: ServerProcess, texts: list[str], expected) -> None:
    streams, threads = run_streams(server.url, texts, MAX_TOKENS)
    for t in threads:
        t.join(120)
    assert_all_exact(streams, expected)


def test_auto_mode_serves_with_two_decode_workers_and_back(builtin_model_dir):
    """The planner's one-move transitions in auto mode (control/planner.py
    `Layout.serving`): 1P/1D -> 2D (both prefill locally, nothing to hand prompts to) and
    back, under streaming load, token-exact."""
    server = ServerProcess(
        "--mode", "auto", "--prefill-workers", "1", "--decode-workers", "1", *COMMON
    )
    try:
        texts = prompts(6, words=40)
        expected = reference(server, texts)
        streams, threads = run_streams(server.url, texts, MAX_TOKENS)
        wait_for(lambda: all(len(s.chunks) >= 2 for s in streams), what="decoding")
        r = admin(server, "POST", "/admin/workers/prefill-0/role", json={"role": "decode"})
        assert r.status_code == 200, r.text
        for t in threads:
            t.join(120)
        assert_all_exact(streams, expected)
        roles = {w: info["role"] for w, info in workers(server).items()}
        assert roles == {"prefill-0": "decode", "decode-0": "decode"}
        serves_exactly(server, texts, expected)  # 2D: all local
        r = admin(server, "POST", "/admin/workers/decode-0/role", json={"role": "prefill"})
        assert r.status_code == 200, r.text  # 1P/1D again, the other way round
        serves_exactly(server, texts, expected)
        assert counter(server, "pdserve:role_switches_total") == 2
        assert_pools_idle(server)
    finally:
        assert server.stop() == 0
