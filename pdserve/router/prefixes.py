"""The router's view of hot prompt prefixes, for operators: `GET /admin/prefixes`.

What it counts. Every request the dispatcher places (a fresh sample, not a migration's
replay) adds its prompt's block hashes to a `FrequencySketch` (kv/frequency.py): one
sighting of each of its prefix chains, decayed by halving, in fixed memory. The hashes are
the ones the dispatcher computed anyway to match the prompt against the global prefix
index, so this adds no hashing — one vectorised sketch update per request. A request is
then filed under its *hot chain*: the longest run of its leading blocks seen at least
twice, named by its last block's hash (a block hash names its whole prefix). So a shared
document followed by unique questions shows up as one chain of the document's length, and
its count is the number of requests that went through it. The table of chains is bounded
(`max_chains`); when it is full the coldest is forgotten. Per chain it keeps which worker
each request was placed on (the prefill worker, else the decode worker).

Why here and not from the workers: only the router sees every request, whichever worker
runs it, and which worker it chose; a worker's counts (kvstore/admission.py) are its own
traffic, kept there because that is where its tier's admission is decided. API keys are
not recorded: the engine client interface does not carry them to the dispatcher.

Never prompt text: the answer holds hashes (hex), lengths and counts only. Which tiers
hold a chain comes from the global prefix index (router/kv_index.py): per worker and
tier, how many of its leading blocks are there.

No torch here: the router imports this module.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pdserve.kv.frequency import FrequencySketch
from pdserve.router.kv_index import KVIndex

DEFAULT_MAX_CHAINS = 512
DEFAULT_SKETCH_WIDTH = 1 << 16  # 512 KiB of counters at depth 4
MIN_HOT_COUNT = 2  # a chain seen once is not a prefix anyone shares (yet)
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


@dataclass(slots=True)
class HotChain:
    hashes: array  # 'Q': the chain's block hashes, head first
    block_size: int
    workers: dict[str, int] = field(default_factory=dict)  # requests placed, per worker
    last_seen: float = 0.0

    @property
    def key(self) -> int:
        return self.hashes[-1]


class HotPrefixes:
    def __init__(
        self, max_chains: int = DEFAULT_MAX_CHAINS, sketch_width: int = DEFAULT_SKETCH_WIDTH
    ) -> None:
        self.max_chains = max_chains
        self.sketch = FrequencySketch(sketch_width)
        self._chains: dict[int, HotChain] = {}
        self.num_requests = 0

    def record(self, block_hashes: Sequence[int], block_size: int, worker_id: str) -> None:
        """One request with this prompt (its full blocks' hashes), placed on `worker_id`."""
        self.num_requests += 1
        counts = self.sketch.add(block_hashes)
        run = next((i for i, c in enumerate(counts) if c < MIN_HOT_COUNT), len(counts))
        if run == 0:
            return
        key = block_hashes[run - 1]
        chain = self._chains.get(key)
        if chain is None:
            chain = HotChain(array("Q", block_hashes[:run]), block_size)
            self._chains[key] = chain
            if len(self._chains) > self.max_chains:
                self._forget_coldest()
        chain.workers[worker_id] = chain.workers.get(worker_id, 0) + 1
        chain.last_seen = time.monotonic()

    def top(self, limit: int) -> list[tuple[HotChain, int]]:
        """The `limit` chains seen most (decayed counts), hottest first."""
        chains = list(self._chains.values())
        counts = self.sketch.estimate([c.key for c in chains])
        ranked = sorted(zip(chains, counts, strict=True), key=lambda pair: -pair[1])
        return ranked[:limit]

    def __len__(self) -> int:
        return len(self._chains)

    def _forget_coldest(self) -> None:
        keys = list(self._chains)
        counts = self.sketch.estimate(keys)
        coldest = min(range(len(keys)), key=counts.__getitem__)
        del self._chains[keys[coldest]]


def held_by(kv_index: KVIndex, block_hashes: Sequence[int]) -> dict[str, dict[str, int]]:
    """Per worker and tier, how many leading blocks of the chain the index lists there."""
    held: dict[str, dict[str, int]] = {}
    walking: set[tuple[str, str]] | None = None
    for i, block_hash in enumerate(block_hashes):
        here = {(w, t) for w, tiers in kv_index.holders(block_hash).items() for t in tiers}
        walking = here if walking is None else walking & here
        if not walking:
            break
        for worker_id, tier in walking:
            held.setdefault(worker_id, {})[tier] = i + 1
    return held


def describe(prefixes: HotPrefixes, kv_index: KVIndex, limit: int) -> dict[str, Any]:
    """The body of `GET /admin/prefixes`: hashes, lengths and counts, never text."""
    now = time.monotonic()
    chains = [
        {
            "hash": f"{chain.key:016x}",
            "head_hash": f"{chain.hashes[0]:016x}",
            "num_blocks": len(chain.hashes),
            "num_tokens": len(chain.hashes) * chain.block_size,
            "hits": count,
            "last_seen_s_ago": round(now - chain.last_seen, 3),
            "requests_by_worker": dict(chain.workers),
            "held": held_by(kv_index, chain.hashes),
        }
        for chain, count in prefixes.top(limit)
    ]
    return {
        "num_requests": prefixes.num_requests,
        "num_tracked_chains": len(prefixes),
        "counts": "decayed: every count halves after "
        f"{prefixes.sketch.sample_size} block sightings",
        "chains": chains,
    }


def parse_limit(raw: str | None) -> int | None:
    """`?limit=` as an int in [1, MAX_LIMIT]; None when it is not one."""
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        return None
    return limit if 1 <= limit <= MAX_LIMIT else None
