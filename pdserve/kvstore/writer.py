"""The background writer: slow-tier writes (disk, Redis) off the engine thread.

The engine step must never wait on a disk or a network, so writes below host RAM are
queued and done by one daemon thread. The queue is bounded in bytes (each queued block
holds a host copy of its KV): when it is full a write is dropped and counted, never waited
for — losing a cache write costs a possible recompute later, blocking costs every running
request's latency now. Shutdown may wait (`submit(wait=True)`, `wait_idle`) to persist.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from pdserve.kv.block_hash import BlockHash
from pdserve.kvstore.block import StoredBlock

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_BYTES = 256 * 2**20

WriteFn = Callable[[StoredBlock, int], None]


class BackgroundWriter:
    """Runs `write(block, tier_index)` for submitted blocks on one daemon thread, in order."""

    def __init__(self, write: WriteFn, max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES):
        self._write = write
        self.max_pending_bytes = max_pending_bytes
        self._queue: deque[tuple[StoredBlock, int]] = deque()
        # Queued or being written, by hash: a lookup finds a block on its way down.
        self._in_flight: dict[BlockHash, tuple[StoredBlock, int]] = {}
        self._cond = threading.Condition()
        self._pending_bytes = 0
        self._is_busy = False
        self._is_closed = False
        self.num_dropped = 0
        self.num_written = 0
        self._thread = threading.Thread(target=self._run, name="kv-tier-writer", daemon=True)
        self._thread.start()

    def is_current_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def find(self, block_hash: BlockHash) -> tuple[StoredBlock, int] | None:
        """(block, destination tier index) if `block_hash` is queued or being written."""
        with self._cond:
            return self._in_flight.get(block_hash)

    @property
    def num_pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, block: StoredBlock, tier_index: int, wait: bool = False) -> bool:
        """Queue a write; without `wait`, drop it (False) if the queue is full."""
        size = block.nbytes
        with self._cond:
            while not self._is_closed and self._is_full(size):
                if not wait:
                    self.num_dropped += 1
                    return False
                self._cond.wait()
            if self._is_closed:
                return False
            self._queue.append((block, tier_index))
            self._in_flight[block.block_hash] = (block, tier_index)
            self._pending_bytes += size
            self._cond.notify_all()
            return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._is_busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish queued writes (up to `timeout`), then stop the thread."""
        self.wait_idle(timeout)
        with self._cond:
            self._is_closed = True
            self._queue.clear()
            self._in_flight.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _is_full(self, size: int) -> bool:
        # An empty queue takes any block, so one block larger than the bound still goes.
        return bool(self._queue) and self._pending_bytes + size > self.max_pending_bytes

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._is_closed:
                    self._cond.wait()
                if self._is_closed:
                    return
                block, tier_index = self._queue.popleft()
                self._is_busy = True
            try:
                self._write(block, tier_index)
            except Exception:  # a cache write must never kill the writer
                logger.exception("KV tier write of block %#x failed", block.block_hash)
            with self._cond:
                if self._in_flight.get(block.block_hash, (None,))[0] is block:
                    del self._in_flight[block.block_hash]
                self._pending_bytes -= block.nbytes
                self._is_busy = False
                self.num_written += 1
                self._cond.notify_all()
