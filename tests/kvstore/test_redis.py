"""The Redis tier against a real redis-server started by the test session."""

from __future__ import annotations

import dataclasses

import redis
import torch

from pdserve.kv.events import BlocksRemoved, BlocksStored
from pdserve.kvstore import HostTier, RedisTier, TieredKVStore
from pdserve.kvstore.block import encode
from pdserve.kvstore.tier import EventSink
from tests.kvstore.builders import LAYOUT, hashes_of, make_chain, raw_bytes, token_ids_of


def test_put_get_round_trip_with_ttl(redis_db):
    tier = RedisTier(redis_db, LAYOUT, ttl_s=600)
    block = make_chain(1)[0]
    tier.put(block)
    assert tier.contains(block.block_hash)
    loaded = tier.get(block.block_hash)
    assert loaded.token_ids == block.token_ids and raw_bytes(loaded) == raw_bytes(block)
    client = redis.Redis.from_url(redis_db)
    assert 0 < client.ttl(tier.key(block.block_hash)) <= 600
    assert tier.key(block.block_hash).startswith(f"pdserve:kv:{LAYOUT.model_id:016x}:")
    assert tier.remove(block.block_hash) and not tier.contains(block.block_hash)
    assert tier.events.drain() == [
        BlocksStored([block.block_hash], "redis"),
        BlocksRemoved([block.block_hash], "redis"),
    ]
    tier.close()


def test_a_second_worker_reads_what_the_first_wrote(redis_db):
    blocks = make_chain(3)
    first = RedisTier(redis_db, LAYOUT)
    for block in blocks:
        first.put(block)
    second = TieredKVStore([HostTier(1 << 20), RedisTier(redis_db, LAYOUT)])
    found = second.lookup(hashes_of(blocks), token_ids_of(blocks))
    assert [raw_bytes(b) for b in found] == [raw_bytes(b) for b in blocks]
    assert second.stats().tiers["redis"].num_hit_blocks == 3
    assert second.tiers[0].num_blocks == 3  # promoted to RAM
    second.close()
    first.close()


def test_corrupt_value_is_a_miss_and_deleted(redis_db):
    tier = RedisTier(redis_db, LAYOUT)
    block = make_chain(1)[0]
    tier.put(block)
    client = redis.Redis.from_url(redis_db)
    key = tier.key(block.block_hash)
    client.set(key, client.get(key)[:-10])
    assert tier.get(block.block_hash) is None
    assert client.exists(key) == 0
    assert tier.stats.num_corrupt_blocks == 1


def test_another_model_does_not_see_the_blocks(redis_db):
    block = make_chain(1)[0]
    RedisTier(redis_db, LAYOUT).put(block)
    other = RedisTier(redis_db, dataclasses.replace(LAYOUT, model_id=123))
    assert other.get(block.block_hash) is None


def test_evicted_host_blocks_go_down_to_redis(redis_db):
    events = EventSink()
    blocks = make_chain(3)
    host = HostTier(blocks[0].nbytes, events)
    store = TieredKVStore([host, RedisTier(redis_db, LAYOUT, events)], events)
    store.put(blocks)
    assert store.flush(10)
    assert store.stats().tiers["redis"].num_blocks == 2
    assert [e for e in store.drain_events() if e.tier == "redis"] == [
        BlocksStored(hashes_of(blocks[:2]), "redis")
    ]
    store.close()


def test_unreachable_server_is_a_miss_not_an_error():
    tier = RedisTier("redis://127.0.0.1:1/0", LAYOUT)
    block = make_chain(1)[0]
    assert tier.put(block) == []
    assert tier.get(block.block_hash) is None
    assert not tier.contains(block.block_hash)


def test_snapshot_lists_this_models_keys(redis_db):
    blocks = make_chain(2)
    tier = RedisTier(redis_db, LAYOUT)
    for block in blocks:
        tier.put(block)
    RedisTier(redis_db, dataclasses.replace(LAYOUT, model_id=5)).put(make_chain(1, seed=3)[0])
    store = TieredKVStore([tier])
    [event] = store.snapshot_events()
    assert event.tier == "redis" and sorted(event.block_hashes) == sorted(hashes_of(blocks))
    store.close()


def test_with_a_secret_blocks_written_without_it_are_refused(redis_db):
    """A shared Redis is reachable by others: a worker with the cluster's secret refuses
    (and deletes) a block someone without it wrote under its keys, even one with a valid
    checksum; a cluster with another secret keeps its blocks under other keys."""
    secret = b"s" * 32
    tier = RedisTier(redis_db, LAYOUT, secret=secret)
    blocks = make_chain(3)
    forged = dataclasses.replace(blocks[1], kv=torch.full_like(blocks[1].kv, 7.0))
    client = redis.Redis.from_url(redis_db)
    client.set(tier.key(blocks[0].block_hash), encode(blocks[0], LAYOUT))  # valid xxh64
    client.set(tier.key(forged.block_hash), encode(forged, LAYOUT, b"x" * 32))
    tier.put(blocks[2])
    assert tier.get(blocks[0].block_hash) is None
    assert tier.get(blocks[1].block_hash) is None
    assert client.exists(tier.key(blocks[0].block_hash), tier.key(blocks[1].block_hash)) == 0
    assert tier.stats.num_corrupt_blocks == 2
    assert raw_bytes(tier.get(blocks[2].block_hash)) == raw_bytes(blocks[2])
    peer = RedisTier(redis_db, LAYOUT, secret=secret)  # another worker of the cluster
    assert raw_bytes(peer.get(blocks[2].block_hash)) == raw_bytes(blocks[2])
    other = RedisTier(redis_db, LAYOUT, secret=b"x" * 32)  # another cluster
    unkeyed = RedisTier(redis_db, LAYOUT)
    for stranger in (other, unkeyed):
        assert stranger.key(blocks[2].block_hash) != tier.key(blocks[2].block_hash)
        assert stranger.get(blocks[2].block_hash) is None
    assert tier.contains(blocks[2].block_hash)  # strangers deleted nothing of ours
    for t in (tier, peer, other, unkeyed):
        t.close()
