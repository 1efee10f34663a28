"""The local disk tier: one content-addressed file per block under a directory, LRU by use.

Files are `<dir>/<hh>/<hash:016x>.kvb` (256 sub-folders keep directories small), each one
block in the self-checking format of `pdserve.kvstore.block`. Why it survives restarts and
crashes:
- writes go to a temporary file in the same folder, then `os.replace` it into place, so a
  reader sees a whole file or none; a crash leaves only `*.tmp` files, removed at start;
- on start the directory is scanned: each file's header is checked (magic, version, layout,
  the hash in its name, its size), bad files are deleted, and the rest are indexed in
  last-use order (file mtimes, which a hit refreshes: atime is unreliable under noatime);
- a read verifies the payload checksum; a truncated, corrupted or foreign file is a miss
  and is deleted.

Eviction is least recently used first; with an admission policy that counts sightings
(`frequencies`, kvstore/admission.py) it takes the coldest of the few least recently used.

The byte cap is enforced on the files this process indexes. Two processes may share one
directory without reading wrong KV (atomic renames, checksums), but each enforces its cap
on its own view; give each worker its own directory for an exact cap.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from pdserve.kv.block_hash import BlockHash
from pdserve.kvstore.block import (
    HEADER_SIZE,
    BlockLayout,
    CorruptBlockError,
    StoredBlock,
    decode,
    encode,
    read_header,
)
from pdserve.kvstore.tier import EventSink, KVTier

logger = logging.getLogger(__name__)

SUFFIX = ".kvb"
EVICTION_WINDOW = 16  # least recently used blocks compared when evicting by frequency
TMP_SUFFIX = ".tmp"


class DiskTier(KVTier):
    name = "disk"

    def __init__(
        self,
        directory: str | Path,
        capacity_bytes: int,
        layout: BlockLayout,
        events: EventSink | None = None,
    ) -> None:
        super().__init__(capacity_bytes, events)
        self.directory = Path(directory)
        self.layout = layout
        self._sizes: OrderedDict[BlockHash, int] = OrderedDict()  # file bytes, LRU first
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scan()

    def path(self, block_hash: BlockHash) -> Path:
        name = f"{block_hash:016x}"
        return self.directory / name[:2] / (name + SUFFIX)

    # ---- KVTier --------------------------------------------------------------------------

    def get(self, block_hash: BlockHash) -> StoredBlock | None:
        if not self.contains(block_hash):
            return None
        path = self.path(block_hash)
        try:
            data = path.read_bytes()
            block = decode(data, self.layout)
            if block.block_hash != block_hash:
                raise CorruptBlockError(f"holds block {block.block_hash:#x}")
        except FileNotFoundError:  # evicted meanwhile (another thread or process)
            self._unindex(block_hash)
            return None
        except (OSError, CorruptBlockError) as e:
            logger.warning("KV disk tier: dropping %s: %s", path, e)
            self._drop_corrupt(block_hash)
            return None
        with self._lock:
            if block_hash in self._sizes:
                self._sizes.move_to_end(block_hash)
            self.stats.read_bytes += len(data)
        _touch(path)
        return block

    def put(self, block: StoredBlock, keep_evicted: bool = False) -> list[StoredBlock]:
        if self.contains(block.block_hash):
            self.touch(block.block_hash)
            return []
        data = encode(block, self.layout)
        if len(data) > self.capacity_bytes:
            return [block] if keep_evicted else []
        try:
            self._write_atomically(self.path(block.block_hash), data)
        except OSError as e:
            logger.warning("KV disk tier: cannot write block %#x: %s", block.block_hash, e)
            return []
        with self._lock:
            if block.block_hash not in self._sizes:  # another thread may have raced us
                self._add(block.block_hash, len(data))
                self.stats.written_bytes += len(data)
            victims = self._pop_over_capacity()
        return self._evict(victims, keep_evicted)

    def contains(self, block_hash: BlockHash) -> bool:
        with self._lock:
            return block_hash in self._sizes

    def remove(self, block_hash: BlockHash) -> bool:
        with self._lock:
            size = self._sizes.pop(block_hash, None)
            if size is None:
                return False
            self._forget(block_hash, size)
        _unlink(self.path(block_hash))
        return True

    def touch(self, block_hash: BlockHash) -> None:
        with self._lock:
            if block_hash not in self._sizes:
                return
            self._sizes.move_to_end(block_hash)
        _touch(self.path(block_hash))

    def hashes(self) -> list[BlockHash]:
        """Every block indexed, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._sizes)

    # ---- internals -----------------------------------------------------------------------

    def _scan(self) -> None:
        found: list[tuple[float, BlockHash, int]] = []
        for path in self.directory.glob("*/*"):
            if path.name.endswith(TMP_SUFFIX):
                _unlink(path)  # a write interrupted by a crash
            elif path.suffix == SUFFIX:
                entry = self._check_file(path)
                if entry is None:
                    self.stats.num_corrupt_blocks += 1
                    _unlink(path)
                else:
                    found.append(entry)
        found.sort()
        with self._lock:
            for _, block_hash, size in found:
                self._add(block_hash, size)
            victims = self._pop_over_capacity()  # the cap may have shrunk since last run
        self._evict(victims, keep_evicted=False)
        if found:
            logger.info("KV disk tier: %d blocks found in %s", len(found), self.directory)

    def _check_file(self, path: Path) -> tuple[float, BlockHash, int] | None:
        """(mtime, hash, size) of a file whose header is valid for this layout, else None."""
        try:
            block_hash = BlockHash(int(path.stem, 16))
            stat = path.stat()
            with path.open("rb") as f:
                header = read_header(f.read(HEADER_SIZE), self.layout)
        except (ValueError, OSError, CorruptBlockError) as e:
            logger.warning("KV disk tier: ignoring %s: %s", path, e)
            return None
        if header.block_hash != block_hash or header.total_size != stat.st_size:
            logger.warning("KV disk tier: ignoring %s: wrong hash or truncated", path)
            return None
        return stat.st_mtime, block_hash, stat.st_size

    def _write_atomically(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
        try:
            with tmp.open("wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            _unlink(tmp)
            raise

    def victim(self, nbytes: int) -> BlockHash | None:
        with self._lock:
            file_size = HEADER_SIZE + nbytes
            if self.stats.used_bytes + file_size <= self.capacity_bytes or not self._sizes:
                return None
            return self._next_victim()

    def _next_victim(self) -> BlockHash:
        """Plain LRU; with `frequencies`, the coldest of the `EVICTION_WINDOW` least
        recently used, the most recent of those on a tie: a chain read or written in
        order is then cut from its tail, and its head stays useful."""
        if self.frequencies is None:
            return next(iter(self._sizes))
        window = list(itertools.islice(self._sizes, EVICTION_WINDOW))
        counts = self.frequencies(window)
        return window[min(range(len(window)), key=lambda i: (counts[i], -i))]

    def _pop_over_capacity(self) -> list[tuple[BlockHash, int]]:
        """Unindex victims until under the cap (caller holds the lock); return them."""
        victims = []
        while self.stats.used_bytes > self.capacity_bytes and self._sizes:
            block_hash = self._next_victim()
            size = self._sizes.pop(block_hash)
            self._forget(block_hash, size)
            victims.append((block_hash, size))
        return victims

    def _evict(self, victims: list[tuple[BlockHash, int]], keep_evicted: bool) -> list[StoredBlock]:
        evicted = []
        for block_hash, _ in victims:
            path = self.path(block_hash)
            if keep_evicted:
                # An unreadable victim is nothing worth passing down.
                with contextlib.suppress(OSError, CorruptBlockError):
                    evicted.append(decode(path.read_bytes(), self.layout))
            _unlink(path)
        return evicted

    def _drop_corrupt(self, block_hash: BlockHash) -> None:
        with self._lock:
            self.stats.num_corrupt_blocks += 1
        self._unindex(block_hash)
        _unlink(self.path(block_hash))

    def _unindex(self, block_hash: BlockHash) -> None:
        with self._lock:
            size = self._sizes.pop(block_hash, None)
            if size is not None:
                self._forget(block_hash, size)

    def _add(self, block_hash: BlockHash, size: int) -> None:
        self._sizes[block_hash] = size
        self.stats.num_blocks += 1
        self.stats.used_bytes += size
        self.events.stored(block_hash, self.name)

    def _forget(self, block_hash: BlockHash, size: int) -> None:
        self.stats.num_blocks -= 1
        self.stats.used_bytes -= size
        self.events.removed(block_hash, self.name)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("KV disk tier: cannot remove %s: %s", path, e)


def _touch(path: Path) -> None:
    # Gone (evicted by another thread or process): the index catches up on the next read.
    with contextlib.suppress(OSError):
        os.utime(path)
