"""The interface every KV tier below the device pool implements, and its counters.

A tier maps block hash → `StoredBlock` under a byte capacity, evicting least recently used
blocks to make room. `put` returns what it evicted (when asked to) so the store can write
it one tier down. Every method is thread-safe: the engine thread reads and promotes while
the store's writer thread writes the slow tiers.

A tier reports its own changes as KV events through the `EventSink` it is given (tier name
in every event), so the worker can publish them to the router's global prefix index.
"""

from __future__ import annotations

import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.kv.block_hash import BlockHash
from pdserve.kv.events import EventLog
from pdserve.kvstore.block import StoredBlock


class EventSink:
    """A thread-safe `EventLog` shared by the tiers of one store."""

    def __init__(self) -> None:
        self._log = EventLog()
        self._lock = threading.Lock()

    def stored(self, block_hash: BlockHash, tier: str) -> None:
        with self._lock:
            self._log.stored(block_hash, tier)

    def removed(self, block_hash: BlockHash, tier: str) -> None:
        with self._lock:
            self._log.removed(block_hash, tier)

    def cleared(self, tier: str) -> None:
        with self._lock:
            self._log.cleared(tier)

    def drain(self) -> list:
        with self._lock:
            return self._log.drain()


@dataclass(slots=True)
class TierStats:
    """Counters of one tier; `num_blocks` and `used_bytes` are what it holds now."""

    num_hit_blocks: int = 0
    num_blocks: int = 0
    used_bytes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    num_corrupt_blocks: int = 0
    num_lookup_blocks: int = 0  # blocks asked of this tier by lookups (hit rate: hits / this)
    # Blocks offered to a slow tier and let in, or refused, by the admission policy.
    num_admitted_blocks: int = 0
    num_rejected_blocks: int = 0


class KVTier(ABC):
    """One storage level keyed by block hash. Subclasses set `name` (the events' tier)."""

    name: str
    # True for tiers whose operations are cheap enough for the engine thread (RAM); the
    # store writes to the others only from its background writer.
    is_fast: bool = False
    # True when `contains` costs a network round trip (Redis): the store then does not ask
    # it before offering a block, and the tier's own write skips what it holds.
    is_remote: bool = False

    def __init__(self, capacity_bytes: int | None, events: EventSink | None = None) -> None:
        self.capacity_bytes = capacity_bytes  # None: bounded elsewhere (e.g. Redis maxmemory)
        self.events = events or EventSink()
        self.stats = TierStats()
        self._lock = threading.RLock()
        # Estimated sightings of blocks (the admission policy's); a tier that can choose
        # its eviction victim takes the coldest. None: plain LRU.
        self.frequencies: Callable[[Sequence[BlockHash]], list[int]] | None = None

    @abstractmethod
    def get(self, block_hash: BlockHash) -> StoredBlock | None:
        """The block, or None if absent or unreadable; a hit counts as a recent use."""

    @abstractmethod
    def put(self, block: StoredBlock, keep_evicted: bool = False) -> list[StoredBlock]:
        """Store `block` (a no-op refresh if present), evicting LRU blocks while over
        capacity; return the evicted blocks if `keep_evicted`, else []."""

    @abstractmethod
    def contains(self, block_hash: BlockHash) -> bool: ...

    @abstractmethod
    def remove(self, block_hash: BlockHash) -> bool:
        """Drop the block; True if it was there."""

    def hashes(self) -> list[BlockHash] | None:
        """Every block held, least recently used first if known; None if the tier cannot
        list them cheaply."""
        return None

    def victim(self, nbytes: int) -> BlockHash | None:
        """The block a put of `nbytes` would evict first; None when it fits, or when the
        tier does not choose its victims (Redis: the server evicts)."""
        return None

    def touch(self, block_hash: BlockHash) -> None:  # noqa: B027 - optional hook
        """Mark the block recently used (default: nothing)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or files (default: nothing)."""

    def record_hit(self) -> None:
        """Count one block served from this tier (the store decides what is a hit)."""
        with self._lock:
            self.stats.num_hit_blocks += 1

    def record_lookups(self, num_blocks: int) -> None:
        """Count blocks a lookup asked this tier for."""
        with self._lock:
            self.stats.num_lookup_blocks += num_blocks

    def record_admission(self, is_admitted: bool) -> None:
        with self._lock:
            if is_admitted:
                self.stats.num_admitted_blocks += 1
            else:
                self.stats.num_rejected_blocks += 1

    def snapshot_stats(self) -> TierStats:
        with self._lock:
            return dataclasses.replace(self.stats)

    @property
    def num_blocks(self) -> int:
        return self.stats.num_blocks

    @property
    def used_bytes(self) -> int:
        return self.stats.used_bytes
