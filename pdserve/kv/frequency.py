"""How often each KV block (so each prefix chain) was seen, in bounded memory, decayed.

A count-min sketch in the manner of TinyLFU (Einziger, Friedman & Manes, "TinyLFU: A
Highly Efficient Cache Admission Policy", 2017): `depth` rows of `width` small counters;
a block hash bumps one counter per row and its estimate is the smallest of them, so an
estimate is never below the true count and above it only when every row collides.
Conservative update (only the counters at the current minimum grow) keeps the
over-estimates small. After `sample_size` additions every counter is halved ("reset"),
so counts fade with age: a prefix popular an hour ago does not keep its place forever,
and memory never grows — `depth x width` 16-bit counters, whatever the traffic.

Why per block and not per prompt: block hashes are chained (kv/block_hash.py), so one
block's hash names the whole prefix up to it. Adding every full block of a request counts
each of the request's prefixes once; the estimate of a block is then how often its
prefix chain was seen.

Block hashes are uniform 64-bit values already, so a row's index is a multiply-shift of
the hash by an odd constant per row (no second hash function to run). Torch-free, used by
the router (`router/prefixes.py`) and the workers' KV tiers (`kvstore/admission.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

# Odd 64-bit multipliers, one per row (digits of well-known irrationals, forced odd).
_MULTIPLIERS = (
    0x9E3779B97F4A7C15,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0xD6E8FEB86659FD93,
    0xFF51AFD7ED558CCD,
    0xC4CEB9FE1A85EC53,
    0x94D049BB133111EB,
    0xBF58476D1CE4E5B9,
)
MAX_COUNT = 0xFFFF
MIN_WIDTH = 64


class FrequencySketch:
    """Decayed occurrence counts of block hashes (thread-safe; see the module docstring)."""

    def __init__(self, width: int, depth: int = 4, sample_size: int | None = None) -> None:
        if not 1 <= depth <= len(_MULTIPLIERS):
            raise ValueError(f"depth must be in [1, {len(_MULTIPLIERS)}], got {depth}")
        width = max(MIN_WIDTH, 1 << max(0, int(width) - 1).bit_length())  # a power of two
        self.width = width
        self.depth = depth
        # TinyLFU's sample: 10 additions per counter column before the counts halve.
        self.sample_size = sample_size if sample_size is not None else 10 * width
        if self.sample_size <= 0:
            raise ValueError(f"sample_size must be positive, got {self.sample_size}")
        self._shift = np.uint64(64 - width.bit_length() + 1)
        self._multipliers = np.array(_MULTIPLIERS[:depth], dtype=np.uint64)[:, None]
        self._rows = np.arange(depth)[:, None]
        self._table = np.zeros((depth, width), dtype=np.uint16)
        self._num_added = 0
        self.num_resets = 0
        self._lock = threading.Lock()

    def add(self, block_hashes: Sequence[int]) -> list[int]:
        """Count one sighting of each (distinct) hash; return their estimates after it."""
        if not len(block_hashes):
            return []
        columns = self._columns(block_hashes)
        with self._lock:
            current = self._table[self._rows, columns]  # [depth, n]
            wanted = np.minimum(current.min(axis=0).astype(np.int64) + 1, MAX_COUNT)
            for row in range(self.depth):  # ufunc.at: colliding columns each keep the max
                np.maximum.at(self._table[row], columns[row], wanted.astype(np.uint16))
            self._num_added += len(block_hashes)
            if self._num_added >= self.sample_size:
                self._reset()
                wanted = self._table[self._rows, columns].min(axis=0)
        return [int(x) for x in wanted]

    def estimate(self, block_hashes: Sequence[int]) -> list[int]:
        """Estimated sightings of each hash (never below the decayed true count)."""
        if not len(block_hashes):
            return []
        columns = self._columns(block_hashes)
        with self._lock:
            return [int(x) for x in self._table[self._rows, columns].min(axis=0)]

    def estimate_one(self, block_hash: int) -> int:
        return self.estimate((block_hash,))[0]

    def _columns(self, block_hashes: Sequence[int]) -> np.ndarray:
        hashes = np.array(block_hashes, dtype=np.uint64)[None, :]
        return ((hashes * self._multipliers) >> self._shift).astype(np.int64)  # [depth, n]

    def _reset(self) -> None:
        """Halve every counter (the caller holds the lock): old sightings fade."""
        self._table >>= 1
        self._num_added //= 2
        self.num_resets += 1

    def halve(self) -> None:
        """Age every count by one halving now (what `sample_size` additions trigger)."""
        with self._lock:
            self._reset()
