"""Disaggregated serving over the nixl backend, where `nixl` is installed (optional extra):
the same tokens as the offline engine, and the KV really moved (transfer bytes metric)."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from pdserve import LLM, SamplingParams
from tests.serving.server import ServerProcess

pytest.importorskip("nixl._api", reason="the nixl package is not installed (optional extra)")

PROMPT = " ".join(f"value{i} = value{i - 1} * {i}" for i in range(1, 60))


def _transfer_bytes(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("pdserve:kv_transfer_bytes_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_disaggregated_over_nixl_matches_offline(builtin_model_dir):
    # Batch-invariant on both sides: the comparison is then exact on every CPU.
    offline = LLM(str(builtin_model_dir), num_threads=1, num_kv_blocks=128, batch_invariant=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = offline.generate([PROMPT], params)[0].outputs[0].text
    server = ServerProcess(
        "--mode",
        "disaggregated",
        "--kv-backend",
        "nixl",
        "--threads-per-worker",
        "1",
        "--kv-cache-memory-gib",
        "0.25",
        "--batch-invariant",
    )
    try:
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        assert _transfer_bytes(server.url) > 0
    finally:
        assert server.stop() == 0
