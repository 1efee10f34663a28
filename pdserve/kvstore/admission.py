"""Which blocks may enter the slow KV tiers (disk, Redis): every one, or the hot ones.

Write-through copies every newly computed block to disk or Redis. On traffic where most
prefixes are seen once (a unique question after a shared document, one agent's
scratchpad), most of those writes are never read back, and in a tier smaller than the
working set each of them pushes out a block that would have been. The `frequency` policy
admits a block only once its prefix chain has been seen `threshold` times, and — when the
tier is full — only if it is seen more often than the block it would evict (TinyLFU's
compare-against-victim); tiers that can choose their victim evict cold chains first.

Where the counts live, and why. They are counted by each worker, in its own
`FrequencySketch`, when a request is admitted (`record`, from the engine's scheduler via
`KVTierConnector.on_admit`), from the block hashes the block manager has just computed to
look up its prefix cache: no hashing of its own, and one vectorised sketch update per
admitted request, not per step. The decisions are the worker's (its tier, its writer), the
counts are those of the requests that reach that worker — what decides whether *its*
disk will be asked for a block again — and the offline engine (`LLM`), which has no
router, works the same way. The router counts all traffic too, but for the operator's
view (`/admin/prefixes`, router/prefixes.py); shipping its counts to the workers would
cost a field on every request message and still leave them unable to compare against
their own eviction victims. A request is counted once per worker that admits it (a
preempted request re-admitted is not counted again).

Policies sit behind a small ABC with a registry keyed by the config name
(`kv_tier_admission`), like the other swappable strategies.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve.kv.block_hash import BlockHash
from pdserve.kv.frequency import FrequencySketch

if TYPE_CHECKING:
    from pdserve.kvstore.tier import KVTier

DEFAULT_THRESHOLD = 2
# Sketch columns per block the slow tiers can hold: enough that estimates of the blocks
# worth keeping rarely collide. Redis has no cap of ours: assume this many blocks.
COLUMNS_PER_BLOCK = 4
UNBOUNDED_TIER_BLOCKS = 1 << 16
MAX_SKETCH_WIDTH = 1 << 20  # 8 MiB of counters at depth 4
MAX_REFUSED = 1 << 14


class AdmissionPolicy(ABC):
    name: str
    counts_sightings: bool = False  # True: `frequencies` answers, tiers may evict by it

    def record(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """One sighting of a request's prefix chain; indices of the blocks whose count
        just reached the admission threshold (they may need writing now)."""
        return []

    @abstractmethod
    def admits(self, block_hash: BlockHash, tier: KVTier, nbytes: int) -> bool:
        """May `block_hash` (`nbytes` long) be written into the slow tier `tier`?"""

    def frequencies(self, block_hashes: Sequence[BlockHash]) -> list[int] | None:
        """Estimated sightings, for tiers that evict cold chains first; None: unknown."""
        return None


class AdmitAll(AdmissionPolicy):
    """Every block is written through (the behaviour before admission existed)."""

    name = "all"

    def admits(self, block_hash: BlockHash, tier: KVTier, nbytes: int) -> bool:
        return True


class FrequencyAdmission(AdmissionPolicy):
    """Admit a block once its chain was seen `threshold` times and, when the tier is full,
    only if it beats the tier's next victim (see the module docstring)."""

    name = "frequency"
    counts_sightings = True

    def __init__(self, sketch: FrequencySketch, threshold: int = DEFAULT_THRESHOLD) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.sketch = sketch
        self.threshold = threshold
        # Blocks refused although past the threshold (the tier was full of hotter ones):
        # offered again at their next sighting. Bounded; the oldest are forgotten.
        self._refused: OrderedDict[BlockHash, None] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_capacity(
        cls, capacity_blocks: int | None, threshold: int = DEFAULT_THRESHOLD
    ) -> FrequencyAdmission:
        blocks = capacity_blocks or UNBOUNDED_TIER_BLOCKS
        width = min(MAX_SKETCH_WIDTH, COLUMNS_PER_BLOCK * blocks)
        return cls(FrequencySketch(width), threshold)

    def record(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        counts = self.sketch.add(block_hashes)
        with self._lock:
            return [
                i
                for i, count in enumerate(counts)
                if count == self.threshold
                or (count > self.threshold and block_hashes[i] in self._refused)
            ]

    def admits(self, block_hash: BlockHash, tier: KVTier, nbytes: int) -> bool:
        count = self.sketch.estimate_one(block_hash)
        if count < self.threshold:
            return False
        victim = tier.victim(nbytes)
        is_admitted = victim is None or count > self.sketch.estimate_one(victim)
        with self._lock:
            if is_admitted:
                self._refused.pop(block_hash, None)
            else:
                self._refused[block_hash] = None
                if len(self._refused) > MAX_REFUSED:
                    self._refused.popitem(last=False)
        return is_admitted

    def frequencies(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        return self.sketch.estimate(block_hashes)


ADMISSION_POLICIES = ("all", "frequency")


def make_admission(
    name: str, capacity_blocks: int | None, threshold: int = DEFAULT_THRESHOLD
) -> AdmissionPolicy:
    """The policy `kv_tier_admission` names, its sketch sized for the slow tiers."""
    if name == "all":
        return AdmitAll()
    if name == "frequency":
        return FrequencyAdmission.for_capacity(capacity_blocks, threshold)
    raise ValueError(f"unknown KV tier admission policy {name!r}; one of {ADMISSION_POLICIES}")
