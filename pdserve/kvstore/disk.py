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

The byte cap is enforced on the files this process indexes. Two processes may share one
directory without reading wrong KV (atomic renames, checksums), but each enforces its cap
on its own view; give each worker its own directory for an exact cap.
"""

from __future__ import annotations

import contextlib
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

    def _pop_over_capacity(self) -> list[tuple[BlockHash, int]]:
        """Unindex LRU files until under the cap (caller holds the lock); return them."""
        victims = []
        while self.stats.used_bytes > self.capacity_bytes and self._sizes:
            block_hash, size = self._sizes.popitem(last=False)
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
