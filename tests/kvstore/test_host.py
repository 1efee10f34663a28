"""The host RAM tier: LRU under an exact byte cap, and its events."""

from __future__ import annotations

from pdserve.kv.events import BlocksRemoved, BlocksStored
from pdserve.kvstore import HostTier
from tests.kvstore.builders import hashes_of, make_chain


def test_lru_cap_keeps_exactly_the_most_recent_blocks():
    blocks = make_chain(6)
    size = blocks[0].nbytes
    tier = HostTier(capacity_bytes=3 * size)
    for block in blocks[:3]:
        assert tier.put(block, keep_evicted=True) == []
    assert tier.get(blocks[0].block_hash) is blocks[0]  # now the most recent
    evicted = tier.put(blocks[3], keep_evicted=True)
    assert hashes_of(evicted) == [blocks[1].block_hash]
    evicted = tier.put(blocks[4], keep_evicted=True)
    assert hashes_of(evicted) == [blocks[2].block_hash]
    assert tier.num_blocks == 3
    assert tier.used_bytes == 3 * size
    assert [tier.contains(b.block_hash) for b in blocks] == [1, 0, 0, 1, 1, 0]


def test_put_of_a_held_block_refreshes_it_only():
    blocks = make_chain(2)
    tier = HostTier(capacity_bytes=2 * blocks[0].nbytes)
    tier.put(blocks[0])
    tier.put(blocks[1])
    tier.put(blocks[0])
    assert tier.num_blocks == 2
    assert hashes_of(tier.blocks()) == [blocks[1].block_hash, blocks[0].block_hash]


def test_a_block_larger_than_the_cap_is_passed_down():
    block = make_chain(1)[0]
    tier = HostTier(capacity_bytes=block.nbytes - 1)
    assert tier.put(block, keep_evicted=True) == [block]
    assert tier.num_blocks == 0


def test_events_name_the_host_tier():
    blocks = make_chain(3)
    tier = HostTier(capacity_bytes=2 * blocks[0].nbytes)
    for block in blocks:
        tier.put(block)
    tier.remove(blocks[2].block_hash)
    h = hashes_of(blocks)
    assert tier.events.drain() == [
        BlocksStored([h[0], h[1], h[2]], "host"),
        BlocksRemoved([h[0], h[2]], "host"),
    ]
