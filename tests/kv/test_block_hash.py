"""The KV block hash: pinned values (persisted caches and other workers depend on them) and
the chain property (equal hashes mean equal prefixes, not merely equal blocks)."""

from __future__ import annotations

import hashlib
import struct

from pdserve.engine.request import Request
from pdserve.kv.block_hash import ROOT_HASH, hash_block, hash_block_chain
from pdserve.sampling_params import SamplingParams

# NOTE: changing these values invalidates every persisted block; bump HASH_KEY when you do.
PINNED_FIRST = 98494707963809807  # hash_block(ROOT_HASH, range(16))
PINNED_SECOND = 14318783667801624493  # its successor over range(16, 32)


def test_pinned_values_for_a_fixed_input():
    assert hash_block(ROOT_HASH, list(range(16))) == PINNED_FIRST
    assert hash_block_chain(list(range(40)), 16) == [PINNED_FIRST, PINNED_SECOND]


def test_format_is_keyed_blake2b_of_parent_and_int64_tokens():
    # Spelled out so that another implementation (router, Redis tier) can reproduce it.
    tokens = [5, 0, 2**40, 31999]
    digest = hashlib.blake2b(key=b"pdserve-kv-v1", digest_size=8)
    digest.update(PINNED_FIRST.to_bytes(8, "little"))
    digest.update(struct.pack("<4q", *tokens))
    expected = int.from_bytes(digest.digest(), "little")
    assert hash_block(PINNED_FIRST, tokens) == expected


def test_hash_is_a_64_bit_unsigned_int():
    for parent in (ROOT_HASH, PINNED_FIRST, PINNED_SECOND):
        value = hash_block(parent, [1, 2, 3])
        assert 0 <= value < 2**64


def test_chain_links_each_block_to_its_parent():
    tokens = list(range(100, 148))
    chain = hash_block_chain(tokens, 16)
    assert chain[0] == hash_block(ROOT_HASH, tokens[:16])
    assert chain[1] == hash_block(chain[0], tokens[16:32])
    assert chain[2] == hash_block(chain[1], tokens[32:48])


def test_same_block_under_different_prefixes_hashes_differently():
    block = list(range(16))
    a = hash_block_chain([1] * 16 + block, 16)
    b = hash_block_chain([2] * 16 + block, 16)
    assert a[1] != b[1]
    assert hash_block(ROOT_HASH, block) not in (a[1], b[1])


def test_shared_prefix_shares_hashes_until_the_first_difference():
    common = list(range(32))
    a = hash_block_chain([*common, *range(500, 516)], 16)
    b = hash_block_chain([*common, *range(600, 616)], 16)
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_only_full_blocks_are_hashed():
    assert hash_block_chain(list(range(15)), 16) == []
    assert len(hash_block_chain(list(range(16)), 16)) == 1
    assert len(hash_block_chain(list(range(47)), 16)) == 2
    assert hash_block_chain([], 16) == []


def test_chain_accepts_a_parent_to_continue_from():
    tokens = list(range(64))
    whole = hash_block_chain(tokens, 16)
    tail = hash_block_chain(tokens[32:], 16, parent=whole[1])
    assert tail == whole[2:]


def test_order_within_a_block_matters():
    assert hash_block(ROOT_HASH, [1, 2]) != hash_block(ROOT_HASH, [2, 1])


def test_request_hashes_match_the_chain_over_prompt_and_outputs():
    request = Request("r", list(range(20)), SamplingParams())
    assert request.update_block_hashes(16) == hash_block_chain(list(range(20)), 16)
    request.output_token_ids += list(range(20, 40))  # 40 tokens: two full blocks
    assert request.update_block_hashes(16) == hash_block_chain(list(range(40)), 16)
