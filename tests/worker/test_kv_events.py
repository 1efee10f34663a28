"""The global prefix index is exact: workers' KV events, applied by the router's `KVIndex`,
reproduce what every worker's prefix cache holds — through prompts sharing prefixes,
evictions from a small pool, a worker restart, a lost batch and a snapshot.

Real engine cores (a tiny Llama, 12 blocks of 16 tokens) publish through the worker's
`KVEventPublisher`; messages go through the real codec, as on the wire.
"""

from __future__ import annotations

import pytest

from pdserve.ipc import messages as m
from pdserve.kv.block_hash import hash_block_chain
from pdserve.kv.events import BlocksRemoved, BlocksStored
from pdserve.router.kv_index import KVIndex, prompt_hashes
from pdserve.sampling_params import SamplingParams
from pdserve.worker.kv_events import CallableEvents, DeviceEvents, KVEventPublisher
from tests.helpers import make_engine_core, make_hf_model_dir, torch_threads

NUM_BLOCKS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("kv-events"), "llama_mha")


class FakeWorker:
    """An engine core and its publisher, as `Worker` wires them."""

    def __init__(self, worker_id: str, model_dir) -> None:
        self.core = make_engine_core(
            model_dir, num_kv_blocks=NUM_BLOCKS, max_num_batched_tokens=64, num_threads=1
        )
        self.publisher = KVEventPublisher(worker_id, [DeviceEvents(self.core.block_manager)])
        self.count = 0

    def run(self, prompt: list[int]) -> list[m.KVEvents]:
        """Run one request to the end; the batches a worker would send (one per step)."""
        self.count += 1
        self.core.add_request(f"r{self.count}", prompt, GREEDY)
        batches = []
        while self.core.has_unfinished_requests():
            self.core.step()
            batch = self.publisher.poll()
            if batch is not None:
                batches.append(batch)
        return batches

    def cached(self) -> set[int]:
        return set(self.core.block_manager.cached_hashes())


def deliver(index: KVIndex, messages: list[m.KVEvents]) -> list[bool]:
    return [index.apply(m.decode(m.encode(msg))) for msg in messages]


def prompt(seed: int, num_tokens: int, shared: int = 0) -> list[int]:
    """`shared` leading tokens common to every prompt, then tokens of this seed."""
    return list(range(300, 300 + shared)) + [
        (seed * 7919 + i * 31) % 250 + 3 for i in range(num_tokens - shared)
    ]


def test_index_equals_the_union_of_the_workers_caches_through_evictions_and_a_restart(
    model_dir,
):
    index = KVIndex()
    workers = {w: FakeWorker(w, model_dir) for w in ("a", "b")}
    for worker in workers.values():
        assert deliver(index, [worker.publisher.snapshot()]) == [True]  # at start-up
    # Prompts of 40-90 tokens sharing a 32-token prefix; 12 blocks per pool, so later
    # requests evict earlier prefixes.
    removed = []
    for i, num_tokens in enumerate([40, 90, 70, 50, 90, 33, 81, 120, 150, 100]):
        worker = workers["a" if i % 3 else "b"]
        batches = worker.run(prompt(i, num_tokens, shared=32))
        assert all(deliver(index, batches))
        removed += [e for b in batches for e in b.events if isinstance(e, BlocksRemoved)]
    assert sum(len(e.block_hashes) for e in removed) == 11  # evictions happened
    for worker_id, worker in workers.items():
        assert index.hashes(worker_id) == worker.cached() != set()
        worker.core.block_manager.check_integrity()
    # The shared prefix is on both workers: its 2 blocks match on both.
    shared = prompt(99, 64, shared=32)
    match = index.match(prompt_hashes(shared, 16), ["a", "b"])
    assert [match[w].num_blocks for w in ("a", "b")] == [2, 2]

    # "b" restarts: the router drops it and its new instance's snapshot (seq 0) re-syncs it.
    index.drop_worker("b")
    workers["b"] = FakeWorker("b", model_dir)
    assert deliver(index, [workers["b"].publisher.snapshot()]) == [True]
    assert index.hashes("b") == set() == workers["b"].cached()
    assert all(deliver(index, workers["b"].run(prompt(7, 60))))
    for worker_id, worker in workers.items():
        assert index.hashes(worker_id) == worker.cached()
    union = workers["a"].cached() | workers["b"].cached()
    assert len(index) == len(union)


def test_a_lost_batch_unsyncs_the_worker_until_its_snapshot(model_dir):
    index = KVIndex()
    worker = FakeWorker("a", model_dir)
    deliver(index, [worker.publisher.snapshot()])
    assert all(deliver(index, worker.run(prompt(1, 40))))
    lost = worker.run(prompt(2, 70))
    assert len(lost) >= 1
    # Batches after a lost one are refused and the worker dropped: the index never guesses.
    later = worker.run(prompt(3, 50))
    assert deliver(index, later) == [False] * len(later) != []
    assert not index.is_synced("a") and index.hashes("a") == set()
    assert deliver(index, [worker.publisher.snapshot()]) == [True]  # what the router asks for
    assert index.is_synced("a") and index.hashes("a") == worker.cached() != set()
    assert all(deliver(index, worker.run(prompt(4, 50))))
    assert index.hashes("a") == worker.cached()


def test_other_tiers_plug_in_as_sources():
    host: list = [BlocksStored([1, 2, 3], "host")]
    source = CallableEvents(
        lambda: [host.pop()] if host else [], lambda: [BlocksStored([9], "host")]
    )
    publisher = KVEventPublisher("w", [source])
    index = KVIndex()
    first = publisher.snapshot()  # drains the pending event: the snapshot supersedes it
    assert (first.seq, first.is_snapshot, host) == (0, True, [])
    assert index.apply(first) and index.hashes("w", "host") == {9}
    assert publisher.poll() is None
    host.append(BlocksRemoved([9], "host"))
    batch = publisher.poll()
    assert (batch.seq, batch.is_snapshot) == (1, False)
    assert index.apply(batch) and index.hashes("w") == set() and len(index) == 0


def test_match_counts_leading_blocks_per_worker_and_device_tier():
    hashes = hash_block_chain(list(range(64)), 16)  # 4 blocks
    index = KVIndex()
    index.apply(m.KVEvents("a", 0, [BlocksStored(hashes[:3])], is_snapshot=True))
    index.apply(
        m.KVEvents(
            "b",
            0,
            [BlocksStored(hashes[:1]), BlocksStored(hashes[1:4], "disk")],
            is_snapshot=True,
        )
    )
    index.apply(m.KVEvents("c", 0, [BlocksStored(hashes[1:])], is_snapshot=True))
    match = index.match(hashes, ["a", "b", "c", "d"])
    assert {w: (x.num_blocks, x.num_device_blocks) for w, x in match.items()} == {
        "a": (3, 3),
        "b": (4, 1),
        "c": (0, 0),  # no first block: the rest of its chain cannot be used
        "d": (0, 0),
    }
    # A prompt of exactly 4 blocks can reuse 3: its last token is always computed.
    assert len(prompt_hashes(list(range(64)), 16)) == 3
    assert len(prompt_hashes(list(range(65)), 16)) == 4
