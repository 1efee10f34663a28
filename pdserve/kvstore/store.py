"""The tiered KV store: host RAM → local disk → Redis behind one lookup, keyed by block hash.

Tiers are ordered fastest first; any of them may be absent. Data moves like this:
- down: blocks leaving the device pool are `put` into the first tier; a block a tier
  evicts to make room is written to the next one (the last tier just drops it). Writes to
  slow tiers (disk, Redis) go through the `BackgroundWriter`: the engine thread only ever
  touches RAM, and when the writer falls behind a write is dropped (counted), not waited on;
- up: `lookup` walks a request's hash chain block by block, taking each block from the
  fastest tier that holds it, and stops at the first miss (a prefix is only useful whole).
  Token ids are compared on every hit. A hit below the first tier is promoted into it, so
  a prefix read from disk once is served from RAM next time.

With `use_int8`, blocks are quantised before they are stored (the caller's thread for the
RAM tier, the writer's for slow tiers) and dequantised when loaded back.

Persistence: the first slow tier (disk, else Redis) is also written *through*: every block
newly computed on the device is queued for it at once (`write_through`), so a worker that
crashes and is restarted finds what it had computed, minus at most the writer's queue.
Eviction-driven write-down still feeds the RAM tier; `persist()` (on a clean shutdown)
writes everything still in RAM down, waiting.

Admission: every block bound for a slow tier — written through, cascaded down, persisted —
is first offered to the `AdmissionPolicy` (kvstore/admission.py): `all` lets every block
in, `frequency` only blocks whose prefix chain was seen often enough (`record`). Refused
blocks are never written; both outcomes are counted per tier. RAM tiers take every block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.kv.block_hash import BlockHash
from pdserve.kv.events import BlocksStored
from pdserve.kvstore.admission import AdmissionPolicy, AdmitAll
from pdserve.kvstore.block import StoredBlock
from pdserve.kvstore.host import HostTier
from pdserve.kvstore.tier import EventSink, KVTier, TierStats
from pdserve.kvstore.writer import DEFAULT_MAX_PENDING_BYTES, BackgroundWriter

PERSIST_TIMEOUT_S = 30.0


@dataclass(slots=True)
class StoreStats:
    """Counters of the whole store (a snapshot); per-tier ones keyed by tier name."""

    num_lookups: int = 0
    num_queried_blocks: int = 0
    num_hit_blocks: int = 0
    num_dropped_writes: int = 0
    num_pending_writes: int = 0
    admission: str = "all"
    tiers: dict[str, TierStats] = field(default_factory=dict)


class TieredKVStore:
    def __init__(
        self,
        tiers: Sequence[KVTier],
        events: EventSink | None = None,
        use_int8: bool = False,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a tiered KV store needs at least one tier")
        self.tiers = list(tiers)
        self.events = events or EventSink()
        self.use_int8 = use_int8
        self.admission = admission or AdmitAll()
        if self.admission.counts_sightings:
            for tier in self.tiers:
                if not tier.is_fast:
                    tier.frequencies = self.admission.frequencies
        self._lock = threading.Lock()
        self._num_lookups = 0
        self._num_queried_blocks = 0
        self._num_hit_blocks = 0
        self._writer = BackgroundWriter(self._write, max_pending_bytes)

    def tier(self, name: str) -> KVTier | None:
        return next((t for t in self.tiers if t.name == name), None)

    # ---- down ----------------------------------------------------------------------------

    def put(self, blocks: Iterable[StoredBlock], wait: bool = False) -> None:
        """Store blocks leaving the device pool in the first tier. Never blocks on I/O
        unless `wait` (shutdown): then a full write queue is waited on, not dropped."""
        for block in blocks:
            self._store(block, 0, wait)

    @property
    def write_through_index(self) -> int | None:
        """Index of the first slow (persistent) tier, or None when every tier is RAM."""
        return next((i for i, t in enumerate(self.tiers) if not t.is_fast), None)

    def write_through(self, blocks: Iterable[StoredBlock], is_admitted: bool = False) -> None:
        """Queue blocks just computed on the device for the first slow tier (never waits:
        a full queue drops the write). Blocks that tier already holds are skipped; the
        others are offered to the admission policy unless `is_admitted` (the caller asked
        `admits_through` before copying them off the device)."""
        index = self.write_through_index
        if index is None:
            return
        tier = self.tiers[index]
        for block in blocks:
            if tier.contains(block.block_hash):
                continue
            if is_admitted or self._admits(block.block_hash, tier, block.nbytes):
                self._writer.submit(block, index)

    def admits_through(self, block_hash: BlockHash, nbytes: int) -> bool:
        """Whether the write-through tier admits this block (the answer is counted)."""
        index = self.write_through_index
        return index is not None and self._admits(block_hash, self.tiers[index], nbytes)

    def record(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """A request's prefix chain was seen once more (at its admission): indices of the
        blocks that just became worth writing to the slow tiers (policy `frequency`)."""
        return self.admission.record(block_hashes)

    def _admits(self, block_hash: BlockHash, tier: KVTier, nbytes: int) -> bool:
        """Ask the policy whether the block may enter the slow `tier`; count the answer."""
        is_admitted = self.admission.admits(block_hash, tier, nbytes)
        tier.record_admission(is_admitted)
        return is_admitted

    def _store(self, block: StoredBlock, index: int, wait: bool = False) -> None:
        if index >= len(self.tiers):
            return  # evicted from the last tier: gone
        tier = self.tiers[index]
        if not tier.is_fast:
            # A block the tier holds already is only refreshed: no admission needed.
            is_held = not tier.is_remote and tier.contains(block.block_hash)
            if not is_held and not self._admits(block.block_hash, tier, block.nbytes):
                return
        if tier.is_fast or self._writer.is_current_thread():
            self._write(block, index, wait)
        else:
            self._writer.submit(block, index, wait)

    def _write(self, block: StoredBlock, index: int, wait: bool = False) -> None:
        """Put into tier `index`; cascade its evictions down. Runs on a thread allowed to
        do that tier's I/O (the writer's for slow tiers, so its cascades run inline)."""
        if self.use_int8:
            block = block.quantized()
        has_next = index + 1 < len(self.tiers)
        for evicted in self.tiers[index].put(block, keep_evicted=has_next):
            self._store(evicted, index + 1, wait)

    # ---- up ------------------------------------------------------------------------------

    def lookup(
        self, block_hashes: Sequence[BlockHash], token_ids_of: Callable[[int], tuple[int, ...]]
    ) -> list[StoredBlock]:
        """The longest prefix of `block_hashes` held across the tiers, as blocks whose token
        ids equal `token_ids_of(i)`; hits below the first tier are promoted into it."""
        found: list[StoredBlock] = []
        to_promote: list[StoredBlock] = []
        for i, block_hash in enumerate(block_hashes):
            block, index = self._find(block_hash, token_ids_of(i))
            if block is None:
                break
            found.append(block)
            if index > 0:
                to_promote.append(block)
        # After the walk: promoting during it could push the chain's own later blocks out.
        for block in to_promote:
            self._store(block, 0)
        with self._lock:
            self._num_lookups += 1
            self._num_queried_blocks += len(block_hashes)
            self._num_hit_blocks += len(found)
        return found

    def _find(
        self, block_hash: BlockHash, token_ids: tuple[int, ...]
    ) -> tuple[StoredBlock | None, int]:
        """The block and the index of the tier it came from, or (None, -1)."""
        for index, tier in enumerate(self.tiers):
            tier.record_lookups(1)
            block = tier.get(block_hash)
            if block is None and index == 0:
                # Evicted from RAM but not yet written below: take it from the queue.
                block, index = self._writer.find(block_hash) or (None, 0)
            if block is None:
                continue
            if block.token_ids != token_ids:
                return None, -1  # a hash collision: the same key holds it in every tier
            self.tiers[index].record_hit()
            return block, index
        return None, -1

    def contains(self, block_hash: BlockHash) -> bool:
        return any(tier.contains(block_hash) for tier in self.tiers)

    # ---- lifecycle -----------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued slow-tier writes; False on timeout."""
        return self._writer.wait_idle(timeout)

    def persist(self, timeout: float = PERSIST_TIMEOUT_S) -> bool:
        """Write every block held in RAM to the next tier down and wait (clean shutdown).
        Returns False if the writes did not finish in `timeout` seconds."""
        first = self.tiers[0]
        if isinstance(first, HostTier) and len(self.tiers) > 1:
            for block in first.blocks():
                self._store(block, 1, wait=True)
        return self.flush(timeout)

    def close(self) -> None:
        self._writer.close()
        for tier in self.tiers:
            tier.close()

    # ---- observability -------------------------------------------------------------------

    def drain_events(self) -> list:
        """KV events of every tier since the last call (thread-safe)."""
        return self.events.drain()

    def snapshot_events(self) -> list:
        """Everything held now, one `BlocksStored` per tier that can list its blocks (a
        full picture for the router's index; Redis lists only this model's keys)."""
        events = []
        for tier in self.tiers:
            hashes = tier.hashes()
            if hashes is not None:
                events.append(BlocksStored([int(h) for h in hashes], tier.name))
        return events

    def stats(self) -> StoreStats:
        with self._lock:
            stats = StoreStats(self._num_lookups, self._num_queried_blocks, self._num_hit_blocks)
        stats.num_dropped_writes = self._writer.num_dropped
        stats.num_pending_writes = self._writer.num_pending
        stats.admission = self.admission.name
        stats.tiers = {tier.name: tier.snapshot_stats() for tier in self.tiers}
        return stats
