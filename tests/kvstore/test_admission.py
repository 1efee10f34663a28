"""Admission into the slow tiers: `all` writes every block, `frequency` a chain seen k
times — at exactly its k-th sight, never a one-hit wonder, not past a hotter victim —
and the disk tier then evicts cold chains first. Counters exact."""

from __future__ import annotations

import pytest

from pdserve.kv.frequency import FrequencySketch
from pdserve.kvstore import DiskTier, HostTier, RedisTier, TieredKVStore
from pdserve.kvstore.admission import AdmitAll, FrequencyAdmission, make_admission
from pdserve.kvstore.block import encode
from pdserve.kvstore.tier import EventSink
from tests.kvstore.builders import LAYOUT, hashes_of, make_chain, raw_bytes, token_ids_of

FILE_SIZE = len(encode(make_chain(1)[0], LAYOUT))
BLOCK_BYTES = make_chain(1)[0].nbytes


def frequency(threshold: int = 2) -> FrequencyAdmission:
    return FrequencyAdmission(FrequencySketch(width=4096, sample_size=10**9), threshold)


def disk_store(tmp_path, admission, disk_blocks: int = 100, host_blocks: int = 0):
    events = EventSink()
    tiers = [HostTier(host_blocks * BLOCK_BYTES, events)] if host_blocks else []
    tiers.append(DiskTier(tmp_path, disk_blocks * FILE_SIZE, LAYOUT, events))
    return TieredKVStore(tiers, events, admission=admission)


def sight(store: TieredKVStore, blocks) -> list[int]:
    """One request with this prefix: counted, then its blocks written through."""
    hot = store.record(hashes_of(blocks))
    store.write_through(blocks)
    assert store.flush(10)
    return hot


def test_a_chain_is_admitted_at_exactly_its_kth_sight(tmp_path):
    store = disk_store(tmp_path, frequency(threshold=3))
    disk = store.tiers[0]
    blocks = make_chain(4)
    assert sight(store, blocks) == []
    assert sight(store, blocks) == []
    assert disk.hashes() == []
    assert sight(store, blocks) == [0, 1, 2, 3]  # the k-th sight: just became hot
    assert disk.hashes() == hashes_of(blocks)
    assert sight(store, blocks) == []  # already hot: nothing new to write
    stats = store.stats().tiers["disk"]
    assert (stats.num_rejected_blocks, stats.num_admitted_blocks) == (8, 4)
    assert stats.written_bytes == 4 * FILE_SIZE
    store.close()


def test_a_one_hit_wonder_is_never_written(tmp_path):
    store = disk_store(tmp_path, frequency(threshold=2))
    hot = make_chain(3, seed=1)
    for _ in range(5):
        sight(store, hot)
    wonder = make_chain(3, seed=2)
    sight(store, wonder)
    disk = store.tiers[0]
    assert disk.hashes() == hashes_of(hot)
    assert not any(disk.path(h).exists() for h in hashes_of(wonder))
    stats = store.stats().tiers["disk"]
    assert stats.num_rejected_blocks == 3 + 3  # the hot chain's first sight, the wonder
    assert stats.written_bytes == 3 * FILE_SIZE
    store.close()


def test_halving_ages_a_chain_below_the_threshold(tmp_path):
    admission = frequency(threshold=2)
    store = disk_store(tmp_path, admission)
    blocks = make_chain(2)
    sight(store, blocks)
    admission.sketch.halve()  # 1 // 2: the first sight is forgotten
    assert sight(store, blocks) == []
    assert store.tiers[0].hashes() == []
    assert sight(store, blocks) == [0, 1]
    store.close()


def test_admitted_blocks_read_back_byte_exact(tmp_path):
    store = disk_store(tmp_path, frequency(threshold=2))
    blocks = make_chain(5)
    sight(store, blocks)
    sight(store, blocks)
    found = store.lookup(hashes_of(blocks), token_ids_of(blocks))
    assert [raw_bytes(b) for b in found] == [raw_bytes(b) for b in blocks]
    stats = store.stats().tiers["disk"]
    assert (stats.num_lookup_blocks, stats.num_hit_blocks) == (5, 5)
    store.close()


def test_a_full_tier_admits_only_what_beats_its_victim(tmp_path):
    store = disk_store(tmp_path, frequency(threshold=2), disk_blocks=2)
    disk = store.tiers[0]
    hot = make_chain(2, seed=1)
    for _ in range(4):
        sight(store, hot)  # count 4, written at the second sight
    assert disk.hashes() == hashes_of(hot)
    newcomer = make_chain(2, seed=2)
    for _ in range(4):
        sight(store, newcomer)  # counts 2..4: never above the victim's 4
    assert disk.hashes() == hashes_of(hot)
    assert sight(store, newcomer) == [0, 1]  # 5 > 4, and it was refused before
    assert sorted(disk.hashes()) == sorted(hashes_of(newcomer))
    store.close()


def test_the_disk_tier_evicts_the_cold_chain_first(tmp_path):
    store = disk_store(tmp_path, frequency(threshold=1), disk_blocks=4)
    disk = store.tiers[0]
    warm, hot = make_chain(2, seed=1), make_chain(2, seed=2)
    sight(store, hot)  # hot goes in first: least recently used
    sight(store, warm)
    for _ in range(3):
        store.record(hashes_of(hot))  # hot seen 4 times, warm once
    newcomer = make_chain(1, seed=3)
    assert sight(store, newcomer) == [0]  # count 1: not above the coldest victim's 1
    assert newcomer[0].block_hash not in disk.hashes()
    sight(store, newcomer)  # 2 > 1: admitted; the cold chain loses its tail, not its head
    expected = [*hashes_of(hot), warm[0].block_hash, newcomer[0].block_hash]
    assert sorted(disk.hashes()) == sorted(expected)
    store.close()


def test_plain_lru_without_counts(tmp_path):
    store = disk_store(tmp_path, AdmitAll(), disk_blocks=2)
    blocks = make_chain(3)
    store.write_through(blocks)
    assert store.flush(10)
    assert store.tiers[0].hashes() == hashes_of(blocks[1:])
    stats = store.stats().tiers["disk"]
    assert (stats.num_admitted_blocks, stats.num_rejected_blocks) == (3, 0)
    assert stats.written_bytes == 3 * FILE_SIZE
    assert store.stats().admission == "all"
    store.close()


def test_ram_takes_every_block_and_the_cascade_below_is_filtered(tmp_path):
    store = disk_store(tmp_path, frequency(threshold=2), host_blocks=1)
    host, disk = store.tiers
    hot, cold = make_chain(1, seed=1), make_chain(1, seed=2)
    store.record(hashes_of(hot))
    store.record(hashes_of(hot))
    store.record(hashes_of(cold))
    store.put(hot)
    store.put(cold)  # pushes hot down: admitted
    store.put(make_chain(1, seed=3))  # pushes cold down: refused
    assert store.flush(10)
    assert disk.hashes() == hashes_of(hot)
    assert host.num_blocks == 1
    stats = store.stats().tiers["disk"]
    assert (stats.num_admitted_blocks, stats.num_rejected_blocks) == (1, 1)
    store.close()


def test_persist_honours_admission(tmp_path):
    store = disk_store(tmp_path, frequency(threshold=2), host_blocks=10)
    hot, cold = make_chain(2, seed=1), make_chain(2, seed=2)
    store.record(hashes_of(hot))
    store.record(hashes_of(hot))
    store.record(hashes_of(cold))
    store.put([*hot, *cold])
    assert store.persist(10)
    assert store.tiers[1].hashes() == hashes_of(hot)
    store.close()


def test_redis_tier_admission(redis_db):
    events = EventSink()
    tier = RedisTier(redis_db, LAYOUT, events)
    store = TieredKVStore([tier], events, admission=frequency(threshold=2))
    blocks, wonder = make_chain(3, seed=1), make_chain(3, seed=2)
    sight(store, blocks)
    sight(store, wonder)
    assert not any(tier.contains(h) for h in hashes_of([*blocks, *wonder]))
    assert sight(store, blocks) == [0, 1, 2]
    assert all(tier.contains(h) for h in hashes_of(blocks))
    assert not any(tier.contains(h) for h in hashes_of(wonder))
    found = store.lookup(hashes_of(blocks), token_ids_of(blocks))
    assert [raw_bytes(b) for b in found] == [raw_bytes(b) for b in blocks]
    stats = store.stats().tiers["redis"]
    assert (stats.num_admitted_blocks, stats.num_rejected_blocks) == (3, 6)
    assert stats.written_bytes == 3 * len(encode(blocks[0], LAYOUT))
    store.close()


def test_make_admission_by_name():
    assert make_admission("all", 100).name == "all"
    policy = make_admission("frequency", 1000, threshold=3)
    assert (policy.name, policy.threshold, policy.sketch.width) == ("frequency", 3, 4096)
    assert make_admission("frequency", None).sketch.width == 1 << 18
    with pytest.raises(ValueError, match="unknown KV tier admission"):
        make_admission("lfu", 10)
