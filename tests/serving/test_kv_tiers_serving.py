"""The disk KV tier in a real `pdserve serve`: a prompt computed before a worker crash, or
before the whole server is restarted, is served from disk afterwards — token for token,
with the cached prefix reported in `usage` and in the per-tier metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx2 as httpx
import pytest

from tests.serving.server import ServerProcess

BLOCK_SIZE = 16
# One block of the built-in model: 8 layers x (k, v) x 16 tokens x 4 kv heads x 64 x 4 B.
BLOCK_BYTES = 8 * 2 * 16 * 4 * 64 * 4


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}\{{([^}}]*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def complete(url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_disk_tier_serves_a_prompt_after_a_worker_crash_and_a_server_restart(
    builtin_model_dir, tmp_path
):
    prompt = " ".join(f"tier{i}" for i in range(150))
    args = ("--mode", "aggregated", "--threads-per-worker", "1")
    # Batch-invariant: a prompt served from the cache (only its last token computed) gives
    # the tokens of its cold prefill exactly, on every CPU.
    args += ("--kv-disk-cache-dir", str(tmp_path), "--batch-invariant")
    server = ServerProcess(*args)
    try:
        first = complete(server.url, prompt)
        num_prompt = first["usage"]["prompt_tokens"]
        num_blocks = (num_prompt - 1) // BLOCK_SIZE  # the last token is always recomputed
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # Written through to disk in the background, with no shutdown to flush it.
        wait_for(
            lambda: (
                metric(server.url, "pdserve:kv_tier_blocks", tier="disk")
                >= num_prompt // BLOCK_SIZE
            ),
            what="the write-through to disk",
        )
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGKILL)  # a crash: no chance to persist anything
        wait_for(lambda: server.worker_pids() not in ([], [pid]), what="the worker restart")
        wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200, 60, "ready")
        again = complete(server.url, prompt)
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == num_blocks * 16
        # Worker stats carry tier counters at most every 0.5 s: wait for them, then exact.
        wait_for(
            lambda: metric(server.url, "pdserve:kv_tier_hit_blocks_total", tier="disk") > 0,
            what="the tier counters",
        )
        hits = metric(server.url, "pdserve:kv_tier_hit_blocks_total", tier="disk")
        assert hits == num_blocks
        assert metric(server.url, "pdserve:kv_tier_read_bytes_total", tier="disk") >= (
            num_blocks * BLOCK_BYTES
        )
    finally:
        assert server.stop() == 0

    server = ServerProcess(*args)  # the whole server again, same folder
    try:
        third = complete(server.url, prompt)
        assert third["choices"][0]["text"] == first["choices"][0]["text"]
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == num_blocks * 16
        assert metric(server.url, "vllm:prefix_cache_hits_total") == num_blocks * 16
        assert metric(server.url, "vllm:prefix_cache_queries_total") == num_prompt
    finally:
        assert server.stop() == 0
    # One subfolder per worker, named by its id, holding one file per block.
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder.name == "mixed-0"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) >= num_prompt // BLOCK_SIZE


def test_frequency_admission_and_admin_prefixes_in_a_real_server(builtin_model_dir, tmp_path):
    """A prompt seen once never reaches disk; seen twice, it does, and /admin/prefixes
    lists its chain (hashes and lengths, no text) held in the device pool and on disk."""
    args = ("--mode", "aggregated", "--threads-per-worker", "1", "--admin-key", "adm")
    args += ("--kv-disk-cache-dir", str(tmp_path), "--kv-tier-admission", "frequency")
    server = ServerProcess(*args)
    try:
        prompt = " ".join(f"hot{i}" for i in range(150))
        first = complete(server.url, prompt)
        complete(server.url, " ".join(f"cold{i}" for i in range(150)))
        num_full = first["usage"]["prompt_tokens"] // BLOCK_SIZE
        wait_for(
            lambda: metric(server.url, "pdserve:kv_tier_rejected_blocks_total") > 0,
            what="the tier counters",
        )
        assert metric(server.url, "pdserve:kv_tier_blocks", tier="disk") == 0
        second = complete(server.url, prompt)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # device hit
        labels = {"tier": "disk", "policy": "frequency"}
        wait_for(
            lambda: (
                metric(server.url, "pdserve:kv_tier_admitted_blocks_total", **labels) == num_full
            ),
            what="the hot prompt's blocks admitted to disk",
        )
        assert metric(server.url, "pdserve:kv_tier_rejected_blocks_total", **labels) >= (
            2 * num_full
        )
        wait_for(
            lambda: metric(server.url, "pdserve:kv_tier_blocks", tier="disk") == num_full,
            what="the write to disk",
        )
        assert httpx.get(server.url + "/admin/prefixes").status_code == 401
        denied = httpx.get(server.url + "/admin/prefixes", headers={"Authorization": "Bearer x"})
        assert denied.status_code == 403
        num_hashed = (first["usage"]["prompt_tokens"] - 1) // BLOCK_SIZE

        def prefixes() -> dict:
            headers = {"Authorization": "Bearer adm"}
            return httpx.get(server.url + "/admin/prefixes", headers=headers).json()

        # The router's index learns of the disk copies from the worker's KV events.
        wait_for(
            lambda: prefixes()["chains"][0]["held"]["mixed-0"].get("disk") == num_hashed,
            what="the disk copies in the router's index",
        )
        body = prefixes()
        [chain] = body["chains"]  # the cold prompt was seen once: not a shared prefix
        assert (chain["num_blocks"], chain["hits"]) == (num_hashed, 2)
        assert chain["requests_by_worker"] == {"mixed-0": 1}
        assert chain["held"]["mixed-0"]["device"] == num_hashed
        assert "hot1" not in json.dumps(body)
    finally:
        assert server.stop() == 0
