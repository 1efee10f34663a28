"""KV cache events: which block hashes a worker's tiers gained or lost.

Every tier that holds KV blocks (the device pool, host RAM, local disk, Redis) reports what
it stores and drops as events keyed by the one block hash (`pdserve.kv.block_hash`).
Workers batch them to the router, whose global prefix index is the union of these events;
the engine reads the device tier's evictions to write the evicted blocks down a tier.

No torch here: the router imports this module.
"""

from __future__ import annotations

from typing import Union

import msgspec

DEVICE = "device"
TIERS = (DEVICE, "host", "disk", "redis")


class KVEvent(msgspec.Struct, tag=True, array_like=True, frozen=True):
    """Base of the KV events; the tag is the class name."""


class BlocksStored(KVEvent):
    """`block_hashes` (in prefix order) are now held in `tier`."""

    block_hashes: list[int]
    tier: str = DEVICE


class BlocksRemoved(KVEvent):
    """`block_hashes` are no longer held in `tier`."""

    block_hashes: list[int]
    tier: str = DEVICE


class AllBlocksCleared(KVEvent):
    """Everything in `tier` is gone (a cache reset)."""

    tier: str = DEVICE


AnyKVEvent = Union[BlocksStored, BlocksRemoved, AllBlocksCleared]  # noqa: UP007


class EventLog:
    """Collects events in order, merging consecutive ones of the same kind and tier."""

    def __init__(self) -> None:
        self._events: list[AnyKVEvent] = []

    def stored(self, block_hash: int, tier: str = DEVICE) -> None:
        self._append(BlocksStored, block_hash, tier)

    def removed(self, block_hash: int, tier: str = DEVICE) -> None:
        self._append(BlocksRemoved, block_hash, tier)

    def cleared(self, tier: str = DEVICE) -> None:
        self._events = [e for e in self._events if e.tier != tier]
        self._events.append(AllBlocksCleared(tier))

    def _append(self, kind: type, block_hash: int, tier: str) -> None:
        last = self._events[-1] if self._events else None
        if type(last) is kind and last.tier == tier:
            last.block_hashes.append(block_hash)  # frozen struct, mutable list
        else:
            self._events.append(kind([block_hash], tier))

    def __len__(self) -> int:
        return len(self._events)

    def drain(self) -> list[AnyKVEvent]:
        events, self._events = self._events, []
        return events
