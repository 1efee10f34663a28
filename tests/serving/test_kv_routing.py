"""The global prefix index, KV-aware routing and delta hand-over on a live cluster.

- Delta hand-over: a prompt sharing a 10-block prefix with one served before goes to the
  decode worker that holds that prefix, which reserves only the other blocks; exactly
  those cross (bytes counted by the router) and the tokens equal the offline engine's.
- `auto`: a long prompt whose prefix the decode worker holds is prefilled there, with no
  hand-over at all.
- Exact index: what the router learnt from the workers' event batches equals the
  snapshots they send when asked.

Prompts are random token ids no other test uses, so no worker has seen them before.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from pdserve import LLM, SamplingParams
from pdserve.ipc import messages as m
from pdserve.router.kv_index import prompt_hashes
from tests.serving.conftest import ENGINE
from tests.serving.test_modes import BLOCK_BYTES

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def fresh(num_tokens: int, key: str) -> list[int]:
    rng = random.Random(key)
    return [rng.randrange(3, 32000) for _ in range(num_tokens)]


@pytest.fixture(scope="module")
def offline(builtin_model_dir):
    return LLM(
        str(builtin_model_dir),
        max_num_batched_tokens=ENGINE.max_num_batched_tokens,
        num_kv_blocks=ENGINE.num_kv_blocks,
        num_threads=1,
        batch_invariant=ENGINE.batch_invariant,
    )


def greedy(offline, prompt: list[int]) -> list[int]:
    (out,) = offline.generate([{"prompt_token_ids": prompt}], GREEDY)
    return out.outputs[0].token_ids


def holders(cluster, prompt: list[int]) -> dict[str, int]:
    """Per worker, leading blocks of `prompt` the router's index says it holds."""
    hashes = prompt_hashes(prompt, 16)
    workers = list(cluster.client.pool.workers)

    async def match():
        return cluster.client.kv_index.match(hashes, workers)

    return {w: x.num_blocks for w, x in cluster.run(match()).items() if x.num_blocks}


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def transfers(cluster) -> tuple[int, int]:
    return cluster.client.num_kv_transfers, cluster.client.num_kv_transfer_bytes


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_delta_hand_over_moves_only_the_blocks_the_decode_worker_lacks(cluster, offline, backend):
    cluster.set_routing(mode="disaggregated", kv_backend=backend)
    prefix = fresh(160, f"delta-{backend}")  # 10 blocks
    first, second = prefix + fresh(40, f"a-{backend}"), prefix + fresh(40, f"b-{backend}")
    before = transfers(cluster)
    out, _ = cluster.generate(first, GREEDY, f"delta-1-{backend}")
    assert out.outputs[0].token_ids == greedy(offline, first)
    after_first = transfers(cluster)
    assert after_first[0] - before[0] == 1
    assert after_first[1] - before[1] == 13 * BLOCK_BYTES  # cdiv(200, 16): all of it
    # The decode and prefill workers of the first request both hold its 12 full blocks.
    wait_for(lambda: sorted(holders(cluster, first).values()) == [12, 12])
    decode_worker = next(
        w for w in holders(cluster, first) if cluster.client.pool.workers[w].role != "prefill"
    )
    out, _ = cluster.generate(second, GREEDY, f"delta-2-{backend}")
    assert out.outputs[0].token_ids == greedy(offline, second)
    after_second = transfers(cluster)
    assert after_second[0] - after_first[0] == 1
    # 10 blocks were already on the decode worker: only blocks 10, 11, 12 move.
    assert after_second[1] - after_first[1] == 3 * BLOCK_BYTES
    wait_for(lambda: holders(cluster, second).get(decode_worker) == 12)
    stats = cluster.wait_idle()
    assert all(free == total for free, total in stats.values()), stats


def test_auto_prefills_locally_what_the_decode_worker_mostly_holds(cluster, offline):
    cluster.set_routing(mode="auto", auto_local_prefill_tokens=64)
    prefix = fresh(160, "auto")
    first, second = prefix + fresh(40, "auto-a"), prefix + fresh(40, "auto-b")
    before = transfers(cluster)
    out, _ = cluster.generate(first, GREEDY, "auto-1")  # 200 uncached tokens: remote
    assert out.outputs[0].token_ids == greedy(offline, first)
    assert transfers(cluster)[0] - before[0] == 1
    wait_for(lambda: sorted(holders(cluster, first).values()) == [12, 12])
    out, _ = cluster.generate(second, GREEDY, "auto-2")  # 40 uncached on the decode worker
    assert out.outputs[0].token_ids == greedy(offline, second)
    assert transfers(cluster)[0] - before[0] == 1  # no second hand-over
    assert out.num_cached_tokens == 160


def test_the_router_index_equals_the_workers_snapshots(cluster):
    client = cluster.client
    cluster.set_routing(mode="auto", auto_local_prefill_tokens=64)
    prompts = [fresh(n, f"exact-{n}") for n in (40, 100, 170)]
    cluster.generate_many(prompts, GREEDY, "exact")
    cluster.wait_idle()
    time.sleep(0.3)  # the last event batches

    async def state():
        index = client.kv_index
        return {w: (index.hashes(w), index._workers[w].next_seq) for w in client.pool.workers}

    before = cluster.run(state())
    assert all(hashes for hashes, _ in before.values())

    async def ask():
        for handle in client.pool.workers.values():
            handle.send(m.SendKVSnapshot())
        await asyncio.sleep(0)

    cluster.run(ask())
    wait_for(lambda: all(seq > before[w][1] for w, (_, seq) in cluster.run(state()).items()))
    after = cluster.run(state())
    assert {w: h for w, (h, _) in after.items()} == {w: h for w, (h, _) in before.items()}
