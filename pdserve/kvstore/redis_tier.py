"""The Redis tier: blocks shared by every worker (and machine) that reaches one server.

Key: `<prefix><model_id:016x>:[<secret id>:]<block hash:016x>`; value: the block in the checksummed
format of `pdserve.kvstore.block`, so a value from another model, layout or a partial write
is a miss, never wrong KV. With a `secret` (a worker holding the cluster key always has
one) that checksum is a keyed MAC: the server is shared and reachable by others, and a
block anyone else wrote there (a forged prompt cache entry) is refused and deleted.

Size policy. The server is shared, so no single worker can enforce a byte cap on it: the
operator sets `maxmemory` with an LRU policy (`allkeys-lru`) on the server, which evicts
the least recently used blocks across all workers. Each key also gets a TTL (a day by
default), refreshed by every hit, so blocks nobody uses expire even on a server without a
memory limit. Neither eviction produces a KV event (Redis does not tell us); the router's
index may then list a block Redis no longer has, which costs one miss, never a wrong
answer.

A Redis error (server down, timeout) is logged and treated as a miss or a dropped write:
the cache is an optimisation and never fails a request.
"""

from __future__ import annotations

import hashlib
import logging

from pdserve.kv.block_hash import BlockHash
from pdserve.kvstore.block import BlockLayout, CorruptBlockError, StoredBlock, decode, encode
from pdserve.kvstore.tier import EventSink, KVTier

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "pdserve:kv:"
DEFAULT_TTL_S = 24 * 3600
SOCKET_TIMEOUT_S = 2.0


def _secret_id(secret: bytes | None) -> str:
    """A key namespace per secret (a one-way fingerprint), so clusters with different
    secrets sharing a server neither read nor delete each other's blocks."""
    if secret is None:
        return ""
    return hashlib.blake2b(secret, digest_size=8, person=b"pdserve-kvns").hexdigest() + ":"


class RedisTier(KVTier):
    name = "redis"
    is_remote = True

    def __init__(
        self,
        url: str,
        layout: BlockLayout,
        events: EventSink | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_s: int | None = DEFAULT_TTL_S,
        secret: bytes | None = None,
    ) -> None:
        import redis  # optional at import time: only a configured Redis tier needs it

        super().__init__(None, events)
        self.layout = layout
        self.ttl_s = ttl_s
        self._secret = secret
        self._prefix = f"{key_prefix}{layout.model_id:016x}:{_secret_id(secret)}"
        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )

    def key(self, block_hash: BlockHash) -> str:
        return f"{self._prefix}{block_hash:016x}"

    def get(self, block_hash: BlockHash) -> StoredBlock | None:
        key = self.key(block_hash)
        try:
            data = self._client.getex(key, ex=self.ttl_s) if self.ttl_s else self._client.get(key)
        except self._errors as e:
            logger.warning("KV redis tier: read failed: %s", e)
            return None
        if data is None:
            return None
        try:
            block = decode(data, self.layout, self._secret)
            if block.block_hash != block_hash:
                raise CorruptBlockError(f"holds block {block.block_hash:#x}")
        except CorruptBlockError as e:
            logger.warning("KV redis tier: dropping %s: %s", key, e)
            with self._lock:
                self.stats.num_corrupt_blocks += 1
            self.remove(block_hash)
            return None
        with self._lock:
            self.stats.read_bytes += len(data)
        return block

    def put(self, block: StoredBlock, keep_evicted: bool = False) -> list[StoredBlock]:
        data = encode(block, self.layout, self._secret)
        try:
            # nx: a block already there (from any worker) is the same bytes; keep it.
            is_new = self._client.set(self.key(block.block_hash), data, ex=self.ttl_s, nx=True)
        except self._errors as e:
            logger.warning("KV redis tier: write failed: %s", e)
            return []
        if is_new:
            with self._lock:
                self.stats.num_blocks += 1
                self.stats.used_bytes += len(data)
                self.stats.written_bytes += len(data)
            self.events.stored(block.block_hash, self.name)
        elif self.ttl_s:
            self._try(self._client.expire, self.key(block.block_hash), self.ttl_s)
        return []  # the server evicts on its own (maxmemory policy, TTL)

    def contains(self, block_hash: BlockHash) -> bool:
        return bool(self._try(self._client.exists, self.key(block_hash)))

    def remove(self, block_hash: BlockHash) -> bool:
        removed = bool(self._try(self._client.delete, self.key(block_hash)))
        if removed:
            self.events.removed(block_hash, self.name)
        return removed

    def touch(self, block_hash: BlockHash) -> None:
        if self.ttl_s:
            self._try(self._client.expire, self.key(block_hash), self.ttl_s)

    def hashes(self) -> list[BlockHash] | None:
        """This model's blocks on the server (all workers'), by SCAN: for snapshots only."""
        try:
            keys = list(self._client.scan_iter(match=f"{self._prefix}*", count=1000))
        except self._errors as e:
            logger.warning("KV redis tier: scan failed: %s", e)
            return None
        start = len(self._prefix)
        return [BlockHash(int(key[start:], 16)) for key in keys]

    def close(self) -> None:
        self._try(self._client.close)

    def _try(self, method, *args):
        try:
            return method(*args)
        except self._errors as e:
            logger.warning("KV redis tier: %s failed: %s", getattr(method, "__name__", method), e)
            return None
