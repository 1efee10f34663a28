"""The tiered store: write-down on eviction, promotion on hit, a writer that never blocks,
per-tier events and counters."""

from __future__ import annotations

import threading
import time

import torch

from pdserve.kv.events import BlocksRemoved, BlocksStored
from pdserve.kvstore import DiskTier, HostTier, KVTier, StoredBlock, TieredKVStore
from pdserve.kvstore.block import encode
from pdserve.kvstore.tier import EventSink
from tests.kvstore.builders import LAYOUT, hashes_of, make_chain, raw_bytes, token_ids_of

BLOCK_BYTES = make_chain(1)[0].nbytes
FILE_SIZE = len(encode(make_chain(1)[0], LAYOUT))


def make_store(tmp_path, host_blocks: int, disk_blocks: int = 100, **kwargs) -> TieredKVStore:
    events = EventSink()
    host = HostTier(host_blocks * BLOCK_BYTES, events)
    disk = DiskTier(tmp_path, disk_blocks * FILE_SIZE, LAYOUT, events)
    return TieredKVStore([host, disk], events, **kwargs)


def test_evict_write_down_promote_round_trip_is_byte_exact(tmp_path):
    store = make_store(tmp_path, host_blocks=2)
    blocks = make_chain(4)
    store.put(blocks)  # host keeps the last two; the first two go down to disk
    assert store.flush(10)
    host, disk = store.tiers
    assert disk.hashes() == hashes_of(blocks[:2])
    assert [host.contains(h) for h in hashes_of(blocks)] == [False, False, True, True]

    found = store.lookup(hashes_of(blocks), token_ids_of(blocks))
    assert hashes_of(found) == hashes_of(blocks)
    assert [raw_bytes(b) for b in found] == [raw_bytes(b) for b in blocks]
    stats = store.stats()
    assert stats.tiers["disk"].num_hit_blocks == 2
    assert stats.tiers["host"].num_hit_blocks == 2
    # Promoted: the disk hits are back in RAM (pushing the host's two down in their turn).
    assert host.contains(blocks[0].block_hash) and host.contains(blocks[1].block_hash)
    store.close()


def test_int8_tiers_round_trip_within_the_quantisation_bound(tmp_path):
    store = make_store(tmp_path, host_blocks=1, use_int8=True)
    blocks = make_chain(3)
    store.put(blocks)
    assert store.flush(10)
    host, disk = store.tiers
    # fp32 → int8 values + float32 scales: the RAM of one raw block holds two.
    assert host.num_blocks == 2 and all(b.is_int8 for b in host.blocks())
    assert disk.hashes() == [blocks[0].block_hash]
    found = store.lookup(hashes_of(blocks), token_ids_of(blocks))
    assert len(found) == 3
    for block, original in zip(found, blocks, strict=True):
        error = (block.to_kv(torch.float32) - original.kv).abs()
        bound = block.scales[:, :, None, :, None] / 2 + 1e-6
        assert bool((error <= bound).all())
    store.close()


def test_lookup_stops_at_the_first_miss_and_verifies_tokens(tmp_path):
    store = make_store(tmp_path, host_blocks=10)
    blocks = make_chain(4)
    store.put([blocks[0], blocks[1], blocks[3]])
    assert hashes_of(store.lookup(hashes_of(blocks), token_ids_of(blocks))) == hashes_of(blocks[:2])
    wrong = make_chain(4, seed=1)
    assert store.lookup(hashes_of(blocks), token_ids_of(wrong)) == []  # a "collision"
    stats = store.stats()
    assert (stats.num_lookups, stats.num_queried_blocks, stats.num_hit_blocks) == (2, 8, 2)
    store.close()


class StuckTier(KVTier):
    """A slow tier whose writes wait until released (a disk or network that hangs)."""

    name = "disk"

    def __init__(self) -> None:
        super().__init__(None)
        self.release = threading.Event()
        self.written: list[StoredBlock] = []

    def get(self, block_hash):
        return None

    def put(self, block, keep_evicted=False):
        self.release.wait(30)
        self.written.append(block)
        return []

    def contains(self, block_hash):
        return False

    def remove(self, block_hash):
        return False


def test_writes_never_block_and_a_full_queue_drops(tmp_path):
    stuck = StuckTier()
    store = TieredKVStore([stuck], max_pending_bytes=3 * BLOCK_BYTES)
    blocks = make_chain(10)
    start = time.monotonic()
    store.put(blocks)
    assert time.monotonic() - start < 1.0
    stats = store.stats()
    # Three blocks fill the queue (the one being written counts until done); seven drop.
    assert stats.num_dropped_writes == 7
    stuck.release.set()
    assert store.flush(10)
    assert hashes_of(stuck.written) == hashes_of(blocks[:3])
    store.close()


def test_a_block_on_its_way_down_is_still_found():
    stuck = StuckTier()
    blocks = make_chain(3)
    store = TieredKVStore([HostTier(BLOCK_BYTES), stuck])
    store.put(blocks)  # two blocks leave RAM for a tier whose writes hang
    found = store.lookup(hashes_of(blocks), token_ids_of(blocks))
    assert [raw_bytes(b) for b in found] == [raw_bytes(b) for b in blocks]
    assert store.stats().tiers["disk"].num_hit_blocks == 2
    stuck.release.set()
    store.close()


def test_events_per_tier(tmp_path):
    store = make_store(tmp_path, host_blocks=2, disk_blocks=1)
    a, b, c = make_chain(3)
    store.put([a, b, c])  # c pushes a to disk
    assert store.flush(10)
    store.put(make_chain(1, seed=5))  # pushes b to disk, whose cap of 1 drops a
    assert store.flush(10)
    d = make_chain(1, seed=5)[0]
    events = store.drain_events()
    assert events == [
        BlocksStored([a.block_hash, b.block_hash, c.block_hash], "host"),
        BlocksRemoved([a.block_hash], "host"),
        BlocksStored([a.block_hash], "disk"),
        BlocksStored([d.block_hash], "host"),
        BlocksRemoved([b.block_hash], "host"),
        BlocksStored([b.block_hash], "disk"),
        BlocksRemoved([a.block_hash], "disk"),
    ]
    stats = store.stats()
    assert stats.tiers["host"].num_blocks == 2 and stats.tiers["disk"].num_blocks == 1
    assert stats.tiers["disk"].written_bytes == 2 * FILE_SIZE
    store.close()


def test_persist_writes_ram_down_for_a_restart(tmp_path):
    store = make_store(tmp_path, host_blocks=10)
    blocks = make_chain(3)
    store.put(blocks)
    assert store.persist(10)
    store.close()
    restarted = make_store(tmp_path, host_blocks=10)
    found = restarted.lookup(hashes_of(blocks), token_ids_of(blocks))
    assert [raw_bytes(b) for b in found] == [raw_bytes(b) for b in blocks]
    assert restarted.stats().tiers["disk"].num_hit_blocks == 3
    restarted.close()


def test_snapshot_lists_every_tier(tmp_path):
    store = make_store(tmp_path, host_blocks=2)
    blocks = make_chain(3)
    store.put(blocks)
    assert store.flush(10)
    assert store.snapshot_events() == [
        BlocksStored(hashes_of(blocks[1:]), "host"),
        BlocksStored(hashes_of(blocks[:1]), "disk"),
    ]
    store.close()
