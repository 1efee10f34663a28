"""Abort and leaks: a request cancelled at any point frees its blocks on every worker.

A cancelled consumer of `generate` is what a client disconnect looks like to the cluster
client (the HTTP layer cancels or closes the stream). Cancels are placed at observable
points: right after dispatch (the prefill is running), when the decode worker has
reserved blocks (KV is moving), and after a few decoded tokens. Afterwards every worker
reports all blocks free and nothing running or waiting.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdserve import SamplingParams
from tests.serving.test_modes import MODES

LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def _prompt(cluster, num_tokens: int) -> list[int]:
    text = Path(__file__).read_text(encoding="utf-8") * 4
    return cluster.client.tokenizer.encode(text, add_special_tokens=False)[:num_tokens]


async def _cancel_when(client, request_id, token_ids, condition) -> int:
    """Consume a stream until `condition(num_updates)` holds, then cancel it."""
    num_updates = 0

    async def consume():
        nonlocal num_updates
        async for _ in client.generate(request_id, None, token_ids, LONG):
            num_updates += 1

    task = asyncio.create_task(consume())
    while not condition(num_updates) and not task.done():
        await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return num_updates


def _reserved(client) -> bool:
    return any(
        c.reservation is not None and c.reservation.done() for c in client._children.values()
    )


@pytest.mark.parametrize("mode", ["aggregated", "disaggregated-shm", "disaggregated-tcp"])
@pytest.mark.parametrize("moment", ["prefill", "transfer", "decode"])
def test_cancel_frees_every_block(cluster, mode, moment):
    cluster.set_routing(**MODES[mode])
    client = cluster.client
    conditions = {
        "prefill": lambda n: bool(client._children),  # dispatched, nothing back yet
        "transfer": lambda n: _reserved(client) or (mode == "aggregated" and n == 0),
        "decode": lambda n: n >= 3,
    }
    num_updates = cluster.run(
        _cancel_when(client, f"cancel-{mode}-{moment}", _prompt(cluster, 900), conditions[moment])
    )
    if moment == "decode":
        assert num_updates >= 3
    else:
        assert num_updates <= 1
    stats = cluster.wait_idle()
    assert all(free == total for free, total in stats.values()), stats
    assert not client._children and not client._streams
    assert all(w.outstanding_tokens == 0 for w in client.pool.workers.values())
    assert all(w.pending_prefill_tokens == 0 for w in client.pool.workers.values())
    for w in client.pool.workers.values():
        assert (w.stats.num_running, w.stats.num_waiting) == (0, 0), w.worker_id


def test_stop_string_stops_the_workers(cluster):
    """A stop string is found by the router; the workers must stop and free at once."""
    cluster.set_routing(mode="disaggregated", kv_backend="shm")
    token_ids = _prompt(cluster, 40)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    output, _ = cluster.generate(token_ids, params, "stop-probe")
    text = output.outputs[0].text
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    assert stop and text.find(stop) > 0
    output, _ = cluster.generate(
        token_ids,
        SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, stop=stop),
        "stop-real",
    )
    assert output.outputs[0].finish_reason == "stop"
    assert output.outputs[0].text == text[: text.find(stop)]
    stats = cluster.wait_idle()
    assert all(free == total for free, total in stats.values()), stats
