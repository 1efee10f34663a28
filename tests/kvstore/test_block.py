"""The block byte format: exact round trips, and every kind of damage detected."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.kvstore.block import HEADER_SIZE, CorruptBlockError, decode, encode
from tests.kvstore.builders import LAYOUT, make_chain, raw_bytes


def test_raw_round_trip_is_byte_exact():
    block = make_chain(1)[0]
    decoded = decode(encode(block, LAYOUT), LAYOUT)
    assert decoded.block_hash == block.block_hash
    assert decoded.token_ids == block.token_ids
    assert not decoded.is_int8
    assert raw_bytes(decoded) == raw_bytes(block)


def test_bfloat16_round_trip_is_byte_exact():
    layout = dataclasses.replace(LAYOUT, dtype=torch.bfloat16)
    block = make_chain(1, layout=layout)[0]
    decoded = decode(encode(block, layout), layout)
    assert decoded.kv.dtype == torch.bfloat16
    assert raw_bytes(decoded) == raw_bytes(block)


def test_int8_round_trip_keeps_values_and_scales():
    block = make_chain(1)[0].quantized()
    decoded = decode(encode(block, LAYOUT), LAYOUT)
    assert decoded.is_int8
    assert torch.equal(decoded.kv, block.kv)
    assert torch.equal(decoded.scales, block.scales)
    original = make_chain(1)[0].kv
    error = (decoded.to_kv(torch.float32) - original).abs()
    bound = block.scales[:, :, None, :, None] / 2 + 1e-6  # [L, 2, 1, H, 1]
    assert bool((error <= bound).all())


@pytest.mark.parametrize("cut", [0, 10, HEADER_SIZE, HEADER_SIZE + 5, -1])
def test_truncated_bytes_are_rejected(cut):
    data = encode(make_chain(1)[0], LAYOUT)
    with pytest.raises(CorruptBlockError):
        decode(data[:cut], LAYOUT)


def test_a_flipped_payload_bit_fails_the_checksum():
    data = bytearray(encode(make_chain(1)[0], LAYOUT))
    data[-3] ^= 0x10
    with pytest.raises(CorruptBlockError, match="checksum"):
        decode(bytes(data), LAYOUT)


@pytest.mark.parametrize(
    "change",
    [
        {"num_layers": 3},
        {"num_kv_heads": 1},
        {"head_dim": 8},
        {"block_size": 8},
        {"dtype": torch.bfloat16},
        {"model_id": 8},
    ],
)
def test_another_layout_or_model_is_rejected(change):
    data = encode(make_chain(1)[0], LAYOUT)
    with pytest.raises(CorruptBlockError):
        decode(data, dataclasses.replace(LAYOUT, **change))


def test_bad_magic_is_rejected():
    data = b"XXXX" + encode(make_chain(1)[0], LAYOUT)[4:]
    with pytest.raises(CorruptBlockError, match="magic"):
        decode(data, LAYOUT)


def test_a_keyed_block_verifies_only_with_its_secret():
    block = make_chain(1)[0]
    secret, other = b"k" * 32, b"o" * 32
    data = encode(block, LAYOUT, secret)
    assert raw_bytes(decode(data, LAYOUT, secret)) == raw_bytes(block)
    for reader in (None, other):
        with pytest.raises(CorruptBlockError, match="checksum"):
            decode(data, LAYOUT, reader)
    with pytest.raises(CorruptBlockError, match="checksum"):  # unkeyed, valid xxh64
        decode(encode(block, LAYOUT), LAYOUT, secret)
