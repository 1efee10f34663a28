"""A worker's side of the global prefix index: publish what its KV tiers hold.

Every tier of a worker (the device pool's prefix cache; later host RAM, disk, Redis)
is a `KVEventSource`: `drain()` returns its events since the last call, `snapshot()` its
whole content as `BlocksStored` events. The `KVEventPublisher` numbers the batches it
makes of them (`KVEvents.seq`, from 0) so the router can apply them in order and notice a
missing one (router/kv_index.py).

A snapshot must agree with the stream: `snapshot()` drains and discards every pending
event first (the snapshot supersedes them) and is taken in the worker's loop, between
steps, when no tier is changing. A source fed from another thread (a background tier
writer) keeps its `drain`/`snapshot` consistent under its own lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pdserve.engine.block_manager import BlockManager
from pdserve.ipc.messages import KVEvents
from pdserve.kv.events import DEVICE, AnyKVEvent, BlocksStored, EventLog


class KVEventSource(Protocol):
    def drain(self) -> list[AnyKVEvent]:
        """Events since the last call, oldest first."""
        ...

    def snapshot(self) -> list[AnyKVEvent]:
        """Everything held now, as `BlocksStored` events (one per tier)."""
        ...


class DeviceEvents:
    """The device pool's prefix cache (the block manager's event log)."""

    def __init__(self, block_manager: BlockManager) -> None:
        if block_manager.events is None:
            block_manager.events = EventLog()
        self.block_manager = block_manager

    def drain(self) -> list[AnyKVEvent]:
        return self.block_manager.events.drain()

    def snapshot(self) -> list[AnyKVEvent]:
        return [BlocksStored([int(h) for h in self.block_manager.cached_hashes()], DEVICE)]


class CallableEvents:
    """A source made of two callables (for tiers that are not a class of their own)."""

    def __init__(
        self,
        drain: Callable[[], list[AnyKVEvent]],
        snapshot: Callable[[], list[AnyKVEvent]],
    ) -> None:
        self.drain = drain
        self.snapshot = snapshot


class KVEventPublisher:
    def __init__(self, worker_id: str, sources: list[KVEventSource] | None = None) -> None:
        self.worker_id = worker_id
        self.sources: list[KVEventSource] = list(sources or [])
        self._next_seq = 0

    def add_source(self, source: KVEventSource) -> None:
        """Plug in another tier; call before the first snapshot (worker start)."""
        self.sources.append(source)

    def poll(self) -> KVEvents | None:
        """The events of every source since the last call, as one message (or None)."""
        events = [event for source in self.sources for event in source.drain()]
        if not events:
            return None
        return self._message(events, is_snapshot=False)

    def snapshot(self) -> KVEvents:
        for source in self.sources:
            source.drain()  # superseded by the snapshot
        events = [event for source in self.sources for event in source.snapshot()]
        return self._message(events, is_snapshot=True)

    def _message(self, events: list[AnyKVEvent], is_snapshot: bool) -> KVEvents:
        message = KVEvents(self.worker_id, self._next_seq, events, is_snapshot)
        self._next_seq += 1
        return message
