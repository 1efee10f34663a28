"""`KVReceiver.write_layer` on the decode side: a batch whose frames do not match its
header (count, run lengths, sizes, bytes, checksum) is refused and writes nothing at all —
the destination pool keeps every byte — and an intact one still lands afterwards."""

from __future__ import annotations

import msgspec
import pytest

from pdserve.ipc import messages as m
from pdserve.transfer.base import KVReceiver, checksum
from pdserve.transfer.tcp import TcpSender
from tests.transfer.helpers import (
    LAYOUT,
    Wire,
    copied,
    destination,
    layer_block_bytes,
    random_pool,
    same_bits,
    xxh3,
)

POOL = msgspec.structs.replace(LAYOUT, num_blocks=24)
SRC_IDS, DST_IDS = [5, 6, 2, 3, 7], [4, 0, 1, 2, 6]  # three source runs: six frames
GATHERED_SRC, GATHERED_DST = list(range(0, 18, 2)), list(range(9, 18))  # nine: gathered


def sent_batch(wire: Wire, src_ids, dst_ids):
    """A batch as it arrives: the source pool, its `KVLayer` and raw frames (layer 1)."""
    src = random_pool(POOL, seed=3)
    dest = destination("tcp", dst_ids, kv_addr=wire.addr)
    TcpSender(src, POOL, wire.peers).send_layer(dest, 1, src_ids, dst_ids)
    msg, frames = wire.receive()
    return src, msg, frames


def signed(msg: m.KVLayer, frames, **changes) -> m.KVLayer:
    """A header whose checksum and byte count match `frames`: only `changes` are wrong."""
    num_bytes = sum(len(f) for f in frames)
    return msgspec.structs.replace(msg, checksum=xxh3(frames), num_bytes=num_bytes, **changes)


def flipped(frame: memoryview, index: int) -> memoryview:
    data = bytearray(frame)
    data[index] ^= 0x01
    return memoryview(data)


def test_batches_not_matching_their_header_are_refused_and_write_nothing(wire):
    src, msg, frames = sent_batch(wire, SRC_IDS, DST_IDS)
    assert (msg.run_lengths, len(frames)) == ([2, 2, 1], 6)
    block = layer_block_bytes(POOL) // 2  # one block's keys (or values)
    pool = random_pool(POOL, seed=4)
    before = pool.clone()
    receiver = KVReceiver(pool)
    k0, v0, k1, v1, k2, v2 = frames
    empty = memoryview(b"")
    extended = memoryview(bytes(v2) + b"\0" * 4)

    def forged(frames, **changes):  # frames and a header signed for them
        return signed(msg, frames, **changes), frames

    damaged = {
        "frame-missing": (msg, frames[:-1]),
        "frame-extra": (msg, [*frames, v2]),
        "frame-missing-signed": forged(frames[:-1]),
        "empty-frame-extra-signed": forged([*frames, empty]),
        "old-format-one-frame": forged([k0], run_lengths=[]),
        "runs-cover-a-block-more-than-ids": forged(frames, block_ids=DST_IDS[:-1]),
        "runs-cover-a-block-less-than-ids": forged(frames, block_ids=[*DST_IDS, 3]),
        "runs-relabelled": forged(frames, run_lengths=[2, 1, 2]),
        "negative-run": forged([*frames, empty, empty], run_lengths=[2, 2, 2, -1]),
        "pairs-swapped": forged([k2, v2, k1, v1, k0, v0]),
        "keys-one-block-short": forged([k0[:-block], *frames[1:]]),
        "values-one-byte-short": forged([k0, v0[:-1], *frames[2:]]),
        "last-frame-extended": forged([*frames[:-1], extended]),
        "num-bytes-wrong": (msgspec.structs.replace(msg, num_bytes=msg.num_bytes - 4), frames),
        "checksum-wrong": (msgspec.structs.replace(msg, checksum=msg.checksum ^ 1), frames),
    }
    for name, (bad_msg, bad_frames) in damaged.items():
        assert receiver.write_layer(bad_msg, bad_frames) is False, name
        assert same_bits(pool, before), name
    assert receiver.write_layer(msg, frames)
    assert same_bits(pool, copied(before, src, 1, SRC_IDS, DST_IDS))


@pytest.mark.parametrize(
    ("src_ids", "dst_ids", "num_frames"),
    [(SRC_IDS, DST_IDS, 6), (GATHERED_SRC, GATHERED_DST, 2)],
    ids=["runs", "gathered"],
)
def test_a_flipped_bit_in_any_frame_is_refused_and_writes_nothing(
    wire, src_ids, dst_ids, num_frames
):
    src, msg, frames = sent_batch(wire, src_ids, dst_ids)
    assert len(frames) == num_frames
    pool = random_pool(POOL, seed=4)
    before = pool.clone()
    receiver = KVReceiver(pool)
    for i, frame in enumerate(frames):
        for at in (0, len(frame) // 2, len(frame) - 1):
            bad = [*frames[:i], flipped(frame, at), *frames[i + 1 :]]
            assert receiver.write_layer(msg, bad) is False, (i, at)
            assert same_bits(pool, before), (i, at)
    assert receiver.write_layer(msg, frames)
    assert same_bits(pool, copied(before, src, 1, src_ids, dst_ids))


def test_an_empty_batch_writes_nothing():
    pool = random_pool(LAYOUT, seed=4)
    before = pool.clone()
    receiver = KVReceiver(pool)
    msg = m.KVLayer("t-1", 0, [], checksum(b""), 0, [])
    assert receiver.write_layer(msg, [])
    assert receiver.write_layer(msg, [memoryview(b""), memoryview(b"")]) is False
    assert same_bits(pool, before)
