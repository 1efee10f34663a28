"""The disk tier: survives a restart, rejects damaged files, keeps its LRU cap exactly."""

from __future__ import annotations

import dataclasses
import os

import torch

from pdserve.kv.events import BlocksRemoved, BlocksStored
from pdserve.kvstore import DiskTier
from pdserve.kvstore.block import encode
from tests.kvstore.builders import LAYOUT, hashes_of, make_chain, raw_bytes

FILE_SIZE = len(encode(make_chain(1)[0], LAYOUT))


def make_tier(path, num_blocks: int = 100, layout=LAYOUT) -> DiskTier:
    return DiskTier(path, num_blocks * FILE_SIZE, layout)


def test_blocks_survive_a_restart(tmp_path):
    blocks = make_chain(3)
    tier = make_tier(tmp_path)
    for block in blocks:
        tier.put(block)
    restarted = make_tier(tmp_path)  # a new process on the same directory
    assert restarted.num_blocks == 3
    assert restarted.used_bytes == 3 * FILE_SIZE
    assert restarted.events.drain() == [BlocksStored(hashes_of(blocks), "disk")]
    for block in blocks:
        loaded = restarted.get(block.block_hash)
        assert loaded.token_ids == block.token_ids
        assert raw_bytes(loaded) == raw_bytes(block)


def test_int8_blocks_survive_a_restart(tmp_path):
    block = make_chain(1)[0].quantized()
    make_tier(tmp_path).put(block)
    loaded = make_tier(tmp_path).get(block.block_hash)
    assert torch.equal(loaded.kv, block.kv) and torch.equal(loaded.scales, block.scales)


def test_truncated_file_is_ignored_and_removed_at_start(tmp_path):
    blocks = make_chain(2)
    tier = make_tier(tmp_path)
    for block in blocks:
        tier.put(block)
    path = tier.path(blocks[1].block_hash)
    path.write_bytes(path.read_bytes()[: FILE_SIZE // 2])
    restarted = make_tier(tmp_path)
    assert restarted.contains(blocks[0].block_hash)
    assert not restarted.contains(blocks[1].block_hash)
    assert restarted.get(blocks[1].block_hash) is None
    assert not path.exists()
    assert restarted.stats.num_corrupt_blocks == 1


def test_file_truncated_while_running_is_a_miss_and_removed(tmp_path):
    block = make_chain(1)[0]
    tier = make_tier(tmp_path)
    tier.put(block)
    path = tier.path(block.block_hash)
    path.write_bytes(path.read_bytes()[:-1])
    assert tier.get(block.block_hash) is None
    assert not path.exists() and tier.num_blocks == 0
    assert tier.events.drain()[-1] == BlocksRemoved([block.block_hash], "disk")


def test_corrupted_checksum_is_a_miss_and_removed(tmp_path):
    block = make_chain(1)[0]
    tier = make_tier(tmp_path)
    tier.put(block)
    path = tier.path(block.block_hash)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size: the start-up scan cannot tell, the read must
    path.write_bytes(bytes(data))
    restarted = make_tier(tmp_path)
    assert restarted.contains(block.block_hash)
    assert restarted.get(block.block_hash) is None
    assert not path.exists()
    assert restarted.num_blocks == 0
    assert restarted.stats.num_corrupt_blocks == 1


def test_files_of_another_layout_and_leftover_temp_files_are_removed(tmp_path):
    block = make_chain(1)[0]
    make_tier(tmp_path).put(block)
    stray = tmp_path / "ab" / ".abcd.kvb.1.2.tmp"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"partial")
    other = make_tier(tmp_path, layout=dataclasses.replace(LAYOUT, model_id=99))
    assert other.num_blocks == 0
    assert not stray.exists()
    assert list(tmp_path.glob("*/*")) == []


def test_file_named_for_another_hash_is_removed(tmp_path):
    a, b = make_chain(2)
    tier = make_tier(tmp_path)
    tier.put(a)
    tier.path(b.block_hash).parent.mkdir(exist_ok=True)
    os.replace(tier.path(a.block_hash), tier.path(b.block_hash))
    assert make_tier(tmp_path).num_blocks == 0


def test_lru_cap_is_exact_and_hits_refresh(tmp_path):
    blocks = make_chain(5)
    tier = make_tier(tmp_path, num_blocks=3)
    for block in blocks[:3]:
        tier.put(block)
    assert tier.get(blocks[0].block_hash) is not None
    evicted = tier.put(blocks[3], keep_evicted=True)
    assert hashes_of(evicted) == [blocks[1].block_hash]
    assert raw_bytes(evicted[0]) == raw_bytes(blocks[1])
    tier.put(blocks[4])
    assert tier.hashes() == [blocks[0].block_hash, blocks[3].block_hash, blocks[4].block_hash]
    assert tier.num_blocks == 3 and tier.used_bytes == 3 * FILE_SIZE
    assert len(list(tmp_path.glob("*/*.kvb"))) == 3


def test_restart_keeps_lru_order_and_applies_a_smaller_cap(tmp_path):
    blocks = make_chain(3)
    tier = make_tier(tmp_path)
    for i, block in enumerate(blocks):
        tier.put(block)
        os.utime(tier.path(block.block_hash), (1000 + i, 1000 + i))
    os.utime(tier.path(blocks[0].block_hash), (2000, 2000))  # used last
    smaller = make_tier(tmp_path, num_blocks=2)
    assert smaller.hashes() == [blocks[2].block_hash, blocks[0].block_hash]
    assert len(list(tmp_path.glob("*/*.kvb"))) == 2
