"""The tiered KV store: device pool → host RAM → local disk → Redis, keyed by block hash.

block.py      StoredBlock, BlockLayout and the checksummed byte format
tier.py       the KVTier interface, its counters, the thread-safe event sink
host.py       host RAM tier (LRU under a byte cap)
disk.py       local disk tier (content-addressed files, survives restarts)
redis_tier.py Redis tier (shared across workers; optional `redis` package)
writer.py     the background writer for slow tiers (bounded; drops, never blocks)
admission.py  which blocks enter the slow tiers: all, or frequently seen prefixes
store.py      TieredKVStore: lookup across tiers, promotion, write-down
fingerprint.py a model fingerprint, so persisted KV is never read by another model

The engine's side (what to save and load, and when) is `engine/kv_tiers.py`: this package
knows blocks, hashes and bytes, never requests or the scheduler, so it sits below `engine/`.
"""

from pdserve.kvstore.block import BlockLayout, CorruptBlockError, StoredBlock
from pdserve.kvstore.disk import DiskTier
from pdserve.kvstore.host import HostTier
from pdserve.kvstore.redis_tier import RedisTier
from pdserve.kvstore.store import StoreStats, TieredKVStore
from pdserve.kvstore.tier import EventSink, KVTier, TierStats

__all__ = [
    "BlockLayout",
    "CorruptBlockError",
    "DiskTier",
    "EventSink",
    "HostTier",
    "KVTier",
    "RedisTier",
    "StoreStats",
    "StoredBlock",
    "TierStats",
    "TieredKVStore",
]
