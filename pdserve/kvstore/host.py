"""The host RAM tier: blocks in an LRU dict under a byte cap, optionally stored as int8.

The fastest tier below the device pool and the only one the engine thread writes to
directly: a put is a dict insert of a tensor already copied off the device. It stores
blocks as given: the store quantises them first when the tiers use int8, so the same RAM
holds 2x (bf16) to 4x (fp32) more blocks.
"""

from __future__ import annotations

from collections import OrderedDict

from pdserve.kv.block_hash import BlockHash
from pdserve.kvstore.block import StoredBlock
from pdserve.kvstore.tier import EventSink, KVTier


class HostTier(KVTier):
    name = "host"
    is_fast = True

    def __init__(self, capacity_bytes: int, events: EventSink | None = None) -> None:
        super().__init__(capacity_bytes, events)
        self._blocks: OrderedDict[BlockHash, StoredBlock] = OrderedDict()  # LRU first

    def get(self, block_hash: BlockHash) -> StoredBlock | None:
        with self._lock:
            block = self._blocks.get(block_hash)
            if block is None:
                return None
            self._blocks.move_to_end(block_hash)
            self.stats.read_bytes += block.nbytes
            return block

    def put(self, block: StoredBlock, keep_evicted: bool = False) -> list[StoredBlock]:
        with self._lock:
            if block.block_hash in self._blocks:
                self._blocks.move_to_end(block.block_hash)
                return []
            if block.nbytes > self.capacity_bytes:
                return [block] if keep_evicted else []  # can never fit: pass it down
            self._blocks[block.block_hash] = block
            self.stats.num_blocks += 1
            self.stats.used_bytes += block.nbytes
            self.stats.written_bytes += block.nbytes
            self.events.stored(block.block_hash, self.name)
            evicted = []
            while self.stats.used_bytes > self.capacity_bytes:
                _, old = self._blocks.popitem(last=False)
                self._forget(old)
                if keep_evicted:
                    evicted.append(old)
            return evicted

    def contains(self, block_hash: BlockHash) -> bool:
        with self._lock:
            return block_hash in self._blocks

    def remove(self, block_hash: BlockHash) -> bool:
        with self._lock:
            block = self._blocks.pop(block_hash, None)
            if block is None:
                return False
            self._forget(block)
            return True

    def touch(self, block_hash: BlockHash) -> None:
        with self._lock:
            if block_hash in self._blocks:
                self._blocks.move_to_end(block_hash)

    def hashes(self) -> list[BlockHash]:
        with self._lock:
            return list(self._blocks)

    def blocks(self) -> list[StoredBlock]:
        """Every block held, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._blocks.values())

    def _forget(self, block: StoredBlock) -> None:
        self.stats.num_blocks -= 1
        self.stats.used_bytes -= block.nbytes
        self.events.removed(block.block_hash, self.name)
