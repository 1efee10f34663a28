"""The one hash function for KV blocks, used by the engine, every cache tier and the router.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal
*prefixes*, not just equal blocks (a hash chain). It is a keyed BLAKE2b digest truncated to
64 bits: stable across processes, machines and restarts (unlike Python's `hash`, which is
salted per process), and cheap enough to run on every full block in Python.

Collisions are astronomically unlikely but the engine still verifies token ids on a hit.
No torch here: the router imports this module.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", int)

# Changing the key invalidates every persisted block, so it is versioned, not configurable.
HASH_KEY = b"pdserve-kv-v1"
ROOT_HASH = BlockHash(0)


# Keying BLAKE2b compresses one block of key material; copying a keyed state skips it
# (a third of the cost of hashing a 16-token block).
_KEYED = hashlib.blake2b(key=HASH_KEY, digest_size=8)


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    digest = _KEYED.copy()
    digest.update(parent.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    return BlockHash(int.from_bytes(digest.digest(), "little"))


def hash_block_chain(
    token_ids: Sequence[int], block_size: int, parent: BlockHash = ROOT_HASH
) -> list[BlockHash]:
    """Hashes of every *full* block of `token_ids`, each chained on the one before."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
