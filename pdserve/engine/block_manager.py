"""The block manager: who owns which KV block, and the prefix cache over them.

The KV pool is cut into fixed-size blocks (16 tokens by default); a request's context is
the list of block ids it holds, in order. Blocks are reference-counted so that requests
sharing a prefix share its blocks.

Prefix cache. Every *full* block is named by a hash chained over all tokens up to its end
(`pdserve.kv.block_hash`). When a block fills, it is registered under its hash; a new
request walks its own chain and reuses every leading block found, after checking the
token ids really match. A block whose last user leaves keeps its contents and its hash: it
goes to the free queue but can still be revived by a hit until it is reused for something
else. The free queue is in LRU order: blocks without a hash go to its front (nothing to
lose), a finished request's blocks go to its back tail-first, so the end of a prefix is
evicted before its beginning and a cached chain stays usable as long as possible.

Events. With `record_events`, every hash registered or forgotten is logged as a KV event
(`pdserve.kv.events`) for the router's global prefix index, and every cached block about
to be *reused* for other data is listed in `evicted` (hash, block id, token ids) so the
engine can copy it down to the next cache tier before the step overwrites it.

The API is ask-then-act: `can_allocate` answers whether there is room, `allocate` takes it.
Running out of blocks is a normal answer ("no"), never an exception; the scheduler decides
whether to wait or preempt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.request import Request
from pdserve.kv.block_hash import BlockHash
from pdserve.kv.events import EventLog


@dataclass(slots=True)
class EvictedBlock:
    """A cached block by hash, id and token ids (evicted, or newly committed)."""

    block_hash: BlockHash
    block_id: int
    token_ids: tuple[int, ...]


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None  # kept while cached, to verify hits


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks (ref_count 0), in eviction order: the first is reused first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        # Per request: how many of its leading blocks have been registered in the cache.
        self._num_committed: dict[str, int] = {}
        self.events: EventLog | None = EventLog() if record_events else None
        # Cached blocks handed out for new data since the last `drain_evicted` (with events).
        self.evicted: list[EvictedBlock] = []
        # Blocks newly registered in the cache, when a write-through tier asks (set to []).
        self.committed: list[EvictedBlock] | None = None

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def find_cached_blocks(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix of `request`'s tokens.

        At least one token is always left to compute: the model must run on the last token
        to produce the logits of the next one.
        """
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        hashes = request.update_block_hashes(size)
        max_hits = (request.num_tokens - 1) // size
        hits: list[int] = []
        for i, block_hash in enumerate(hashes[:max_hits]):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            expected = tuple(request.token_ids(i * size, (i + 1) * size))
            if self.blocks[block_id].token_ids != expected:
                break  # a hash collision: treat as a miss
            hits.append(block_id)
        return hits

    def num_blocks_to_take(
        self, request: Request, num_new_tokens: int, cached_block_ids: Sequence[int] = ()
    ) -> int:
        """Free-queue entries an `allocate` with these arguments would consume."""
        num_tokens = (
            request.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        )
        num_held = len(request.block_ids) + len(cached_block_ids)
        num_new_blocks = max(0, cdiv(num_tokens, self.block_size) - num_held)
        num_revived = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        return num_new_blocks + num_revived

    def can_allocate(
        self, request: Request, num_new_tokens: int, cached_block_ids: Sequence[int] = ()
    ) -> bool:
        needed = self.num_blocks_to_take(request, num_new_tokens, cached_block_ids)
        return needed <= self.num_free_blocks

    # ---- actions -------------------------------------------------------------------------

    def allocate(
        self, request: Request, num_new_tokens: int, cached_block_ids: Sequence[int] = ()
    ) -> None:
        """Give `request` the cached prefix blocks plus enough new blocks for
        `num_new_tokens` more tokens. Call `can_allocate` first."""
        if not self.can_allocate(request, num_new_tokens, cached_block_ids):
            raise RuntimeError(f"allocate without room for request {request.request_id}")
        for block_id in cached_block_ids:
            self._take(block_id)
        request.block_ids.extend(cached_block_ids)
        if cached_block_ids:  # hits come only at admission, into an empty block list
            self._num_committed[request.request_id] = len(request.block_ids)
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_tokens += len(cached_block_ids) * self.block_size
        while len(request.block_ids) < cdiv(num_tokens, self.block_size):
            request.block_ids.append(self._take_fresh())

    def try_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """`can_allocate` then `allocate` for a request without a cached prefix to add (a
        running request's next tokens), in one pass: False, and nothing taken, when there
        is no room. A decode step inside the request's last block takes nothing."""
        size = self.block_size
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_held = len(request.block_ids)
        if num_tokens <= num_held * size:
            return True
        num_needed = cdiv(num_tokens, size) - num_held
        if num_needed > len(self._free):
            return False
        for _ in range(num_needed):
            request.block_ids.append(self._take_fresh())
        return True

    def extend_blocks(self, requests: Sequence[Request]) -> None:
        """One fresh block to each of `requests`, in that order (a request listed twice
        gets two); there must be room (`decode_run_length` checked)."""
        if len(requests) > len(self._free):
            raise RuntimeError("extend_blocks without room")
        for request in requests:
            request.block_ids.append(self._take_fresh())

    def commit_full_blocks(self, request: Request) -> None:
        """Register in the prefix cache every block of `request` that is now full of
        computed tokens. Called after each step that advanced the request."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        num_full = request.num_computed_tokens // size
        start = self._num_committed.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = request.update_block_hashes(size)
        for i in range(start, num_full):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                block.token_ids = tuple(request.token_ids(i * size, (i + 1) * size))
                self._cached[hashes[i]] = block.block_id
                if self.events is not None:
                    self.events.stored(hashes[i])
                if self.committed is not None:
                    self.committed.append(EvictedBlock(hashes[i], block.block_id, block.token_ids))
        self._num_committed[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release every block of `request` (finished, aborted or preempted)."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        self._num_committed.pop(request.request_id, None)

    def drain_evicted(self) -> list[EvictedBlock]:
        """Cached blocks reused since the last call. Their contents are intact until the
        next model step writes them: copy them out before running it."""
        evicted, self.evicted = self.evicted, []
        return evicted

    def cached_hashes(self) -> list[BlockHash]:
        """Every hash in the prefix cache now (a full snapshot for the router's index)."""
        return list(self._cached)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no request holds; return how many."""
        dropped = 0
        for block_id in self._free:
            dropped += self._forget(self.blocks[block_id])
        return dropped

    # ---- internals -----------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if self.events is not None and block.block_hash is not None:
            self.evicted.append(EvictedBlock(block.block_hash, block_id, block.token_ids))
        self._forget(block)
        block.ref_count = 1
        return block_id

    def _forget(self, block: KVBlock) -> int:
        if block.block_hash is None:
            return 0
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
            if self.events is not None:
                self.events.removed(block.block_hash)
        block.block_hash = None
        block.token_ids = None
        return 1

    def check_integrity(self) -> None:
        """Assert the bookkeeping is self-consistent (tests and idle-time checks)."""
        for block in self.blocks:
            in_free = block.block_id in self._free
            if (block.ref_count == 0) != in_free or block.ref_count < 0:
                raise AssertionError(
                    f"block {block.block_id}: ref {block.ref_count}, free {in_free}"
                )
        for block_hash, block_id in self._cached.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise AssertionError(f"cache entry {block_hash:#x} -> block {block_id} is stale")
