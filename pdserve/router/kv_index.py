"""The global prefix index: which worker holds which KV block, in which tier.

Workers publish what their KV tiers gain and lose as `KVEvents` (worker/kv_events.py);
this index is the union of them: block hash → {worker id → tiers holding it}, plus each
worker's own hash sets so a dead or restarted worker is dropped in one go.

Exactness. A worker numbers its `KVEvents` 0, 1, 2, ... and sends them on one ordered
socket, its first one a snapshot. The index applies a worker's events only in sequence:
a missing number (a message lost with a restarted router, a worker the index has never
synced with) drops what it knew of the worker and marks it unsynced until a snapshot
arrives, which the caller asks for (`SendKVSnapshot`). So the index never holds a guess:
for every synced worker it equals what the worker's tiers hold after the last event
applied.

Matching. Block hashes are chained (kv/block_hash.py), so a prompt's cached prefix on a
worker is the run of its leading block hashes that worker holds. `match` walks the
chain once for every candidate at a time. Hashes depend on the block size: callers hash
the prompt with each worker's block size (`prompt_hashes`).

No torch here: the router imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.ipc.messages import KVEvents
from pdserve.kv.block_hash import BlockHash, hash_block_chain
from pdserve.kv.events import DEVICE, AllBlocksCleared, BlocksRemoved, BlocksStored


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """A worker's cached prefix of one prompt, in blocks."""

    num_blocks: int  # leading blocks held in some tier
    num_device_blocks: int  # leading blocks held in the device pool (usable at once)


@dataclass(slots=True)
class _WorkerState:
    next_seq: int | None = None  # None: unsynced, waiting for a snapshot
    tiers: dict[str, set[int]] = field(default_factory=dict)  # tier -> hashes


class KVIndex:
    def __init__(self) -> None:
        self._holders: dict[int, dict[str, set[str]]] = {}  # hash -> worker -> tiers
        self._workers: dict[str, _WorkerState] = {}

    # ---- updates ---------------------------------------------------------------------------

    def apply(self, message: KVEvents) -> bool:
        """Apply one worker's events. False when they could not be applied in order (the
        worker's entries are dropped): the caller should ask it for a snapshot."""
        state = self._workers.setdefault(message.worker_id, _WorkerState())
        if message.is_snapshot:
            self._clear(message.worker_id, state)
        elif state.next_seq != message.seq:
            self._clear(message.worker_id, state)
            state.next_seq = None
            return False
        for event in message.events:
            self._apply_event(message.worker_id, state, event)
        state.next_seq = message.seq + 1
        return True

    def drop_worker(self, worker_id: str) -> None:
        """Forget a worker (dead, or restarted: its next snapshot re-syncs it)."""
        state = self._workers.pop(worker_id, None)
        if state is not None:
            self._clear(worker_id, state)

    def is_synced(self, worker_id: str) -> bool:
        state = self._workers.get(worker_id)
        return state is not None and state.next_seq is not None

    def _apply_event(self, worker_id: str, state: _WorkerState, event) -> None:
        if isinstance(event, BlocksStored):
            held = state.tiers.setdefault(event.tier, set())
            for block_hash in event.block_hashes:
                if block_hash not in held:
                    held.add(block_hash)
                    self._holders.setdefault(block_hash, {}).setdefault(worker_id, set()).add(
                        event.tier
                    )
        elif isinstance(event, BlocksRemoved):
            held = state.tiers.get(event.tier, set())
            for block_hash in event.block_hashes:
                if block_hash in held:
                    held.discard(block_hash)
                    self._unlink(block_hash, worker_id, event.tier)
        elif isinstance(event, AllBlocksCleared):
            for block_hash in state.tiers.pop(event.tier, set()):
                self._unlink(block_hash, worker_id, event.tier)

    def _unlink(self, block_hash: int, worker_id: str, tier: str) -> None:
        workers = self._holders[block_hash]
        tiers = workers[worker_id]
        tiers.discard(tier)
        if not tiers:
            del workers[worker_id]
            if not workers:
                del self._holders[block_hash]

    def _clear(self, worker_id: str, state: _WorkerState) -> None:
        for tier, hashes in state.tiers.items():
            for block_hash in hashes:
                self._unlink(block_hash, worker_id, tier)
        state.tiers = {}

    # ---- queries ---------------------------------------------------------------------------

    def hashes(self, worker_id: str, tier: str | None = None) -> set[int]:
        """What the index holds for a worker: one tier, or the union of its tiers."""
        state = self._workers.get(worker_id)
        if state is None:
            return set()
        if tier is not None:
            return set(state.tiers.get(tier, ()))
        return set().union(*state.tiers.values())

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, block_hash: int) -> dict[str, frozenset[str]]:
        """Which workers hold the block, and in which tiers (a copy)."""
        return {w: frozenset(t) for w, t in self._holders.get(block_hash, {}).items()}

    def match(
        self, block_hashes: Sequence[BlockHash], worker_ids: Iterable[str]
    ) -> dict[str, PrefixMatch]:
        """Per worker, how many leading blocks of `block_hashes` it holds (any tier, and in
        its device pool)."""
        wanted = list(worker_ids)
        any_tier = dict.fromkeys(wanted, 0)
        device = dict.fromkeys(wanted, 0)
        walking_any, walking_device = set(wanted), set(wanted)
        for i, block_hash in enumerate(block_hashes):
            holders = self._holders.get(block_hash)
            if not holders:
                break
            for worker_id in list(walking_any):
                tiers = holders.get(worker_id)
                if tiers is None:
                    walking_any.discard(worker_id)
                    walking_device.discard(worker_id)
                    continue
                any_tier[worker_id] = i + 1
                if worker_id in walking_device:
                    if DEVICE in tiers:
                        device[worker_id] = i + 1
                    else:
                        walking_device.discard(worker_id)
            if not walking_any:
                break
        return {w: PrefixMatch(any_tier[w], device[w]) for w in wanted}


def prompt_hashes(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """The prompt's block hashes that can ever be prefix hits: a worker always computes at
    least the last prompt token, so a prompt of exactly k full blocks can reuse k - 1."""
    return hash_block_chain(token_ids[: max(0, len(token_ids) - 1)], block_size)
