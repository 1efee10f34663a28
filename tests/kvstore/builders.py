"""Builders of the KV tier tests: a small block layout and blocks of real hash chains."""

from __future__ import annotations

import torch

from pdserve.kv.block_hash import ROOT_HASH, BlockHash, hash_block_chain
from pdserve.kvstore import BlockLayout, StoredBlock

LAYOUT = BlockLayout(
    num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32, model_id=7
)


def make_chain(num_blocks: int, seed: int = 0, layout: BlockLayout = LAYOUT) -> list[StoredBlock]:
    """`num_blocks` blocks of one prompt (a real hash chain), random KV from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = [1000 * (seed + 1) + i for i in range(num_blocks * layout.block_size)]
    hashes = hash_block_chain(token_ids, layout.block_size, ROOT_HASH)
    size = layout.block_size
    return [
        StoredBlock(
            block_hash,
            tuple(token_ids[i * size : (i + 1) * size]),
            torch.randn(layout.kv_shape, generator=generator).to(layout.dtype),
        )
        for i, block_hash in enumerate(hashes)
    ]


def token_ids_of(blocks: list[StoredBlock]):
    return lambda i: blocks[i].token_ids


def hashes_of(blocks: list[StoredBlock]) -> list[BlockHash]:
    return [b.block_hash for b in blocks]


def raw_bytes(block: StoredBlock) -> bytes:
    return block.kv.contiguous().view(torch.uint8).numpy().tobytes()
