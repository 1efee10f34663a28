"""The tcp backend's sending side, over real ZeroMQ sockets.

- a batch is one `KVLayer` then, per run of consecutive source blocks, the run's keys and
  values as two frames (bit for bit the pool's bytes, float32 and bfloat16), up to
  `MAX_ZERO_COPY_RUNS` runs; beyond that one gathered pair; checksum and sizes as announced;
- gather buffers are reused once sent, never while ZeroMQ may still read them;
- `flush` returns once ZeroMQ is done with the pool; a decode worker that never comes up
  makes `send_layer` and `flush` raise `TransferError` in bounded time, not hang.

Frames under pyzmq's copy threshold (64 KiB) are copied by pyzmq despite `copy=False`;
tests that need frames really in flight use `BIG`, whose single blocks reach it.
"""

from __future__ import annotations

import logging
import time

import msgspec
import pytest
import torch
import zmq

from pdserve.engine.scheduler import ScheduledRequest
from pdserve.ipc import messages as m
from pdserve.transfer import base
from pdserve.transfer.base import KVReceiver, PeerSockets, TransferError, checksum
from pdserve.transfer.streamer import HandOff, KVStreamer
from pdserve.transfer.tcp import MAX_ZERO_COPY_RUNS, TcpSender
from tests.helpers import make_request
from tests.transfer.helpers import (
    LAYOUT,
    Wire,
    copied,
    destination,
    layer_block_bytes,
    random_pool,
    same_bits,
    tensor_bytes,
    unused_addr,
    xxh3,
)

POOL = msgspec.structs.replace(LAYOUT, num_blocks=24)  # room for more than 8 runs
BIG = m.KVLayout(2, 20, 16, 4, 256, "float32")  # a block's keys: 64 KiB, zero-copy for real
NINE_RUNS = list(range(0, 18, 2))


def test_the_big_layout_reaches_pyzmqs_copy_threshold():
    assert layer_block_bytes(BIG) // 2 >= zmq.COPY_THRESHOLD
    assert MAX_ZERO_COPY_RUNS == 8  # the cases below straddle it


def send(wire: Wire, sender: TcpSender, layer: int, src_ids, dst_ids, addr=None) -> int:
    dest = destination("tcp", dst_ids, kv_addr=addr or wire.addr)
    return sender.send_layer(dest, layer, src_ids, dst_ids)


SENDS = {  # source ids, destination ids, the run lengths they go as
    "one-run": ([0, 1, 2, 3], [4, 5, 6, 7], [4]),
    "two-runs": ([6, 0, 1, 2], [1, 5, 6, 3], [1, 3]),
    "three-runs": ([5, 6, 2, 3, 7], [1, 5, 6, 3, 0], [2, 2, 1]),
    "eight-runs": ([14, 12, 10, 8, 6, 4, 2, 0], list(range(8)), [1] * 8),
    "nine-runs-gathered": (NINE_RUNS, list(range(23, 14, -1)), [9]),
    "gathered-in-order": ([20, 21, 0, 2, 4, 6, 8, 10, 12, 14, 15], list(range(11)), [11]),
}


@pytest.mark.parametrize("case", SENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tcp_batch_is_a_frame_pair_per_source_run_and_lands_exactly(wire, dtype, case):
    layout = msgspec.structs.replace(POOL, dtype=dtype)
    src_ids, dst_ids, run_lengths = SENDS[case]
    src = random_pool(layout, seed=3)
    num_bytes = send(wire, TcpSender(src, layout, wire.peers), 1, src_ids, dst_ids)
    msg, frames = wire.receive()
    assert num_bytes == len(src_ids) * layer_block_bytes(layout)
    assert msg == m.KVLayer("t-1", 1, dst_ids, xxh3(frames), num_bytes, run_lengths)
    assert msg.checksum == checksum(b"".join(frames))  # xxh3 of the frames, end to end
    expected, offset = [], 0
    for n in run_lengths:  # keys then values of each run's blocks, in order
        ids = src_ids[offset : offset + n]
        offset += n
        expected += [tensor_bytes(src[1, 0, ids]), tensor_bytes(src[1, 1, ids])]
    assert [bytes(f) for f in frames] == expected
    pool = random_pool(layout, seed=4)
    before = pool.clone()
    assert KVReceiver(pool).write_layer(msg, frames)
    assert same_bits(pool, copied(before, src, 1, src_ids, dst_ids))


def test_tcp_sender_reuses_sent_gather_buffers_in_and_out_of_inference_mode(wire):
    src = random_pool(POOL, seed=3)
    sender = TcpSender(src, POOL, wire.peers)
    pool = torch.zeros(POOL.shape)
    expected = pool.clone()
    sends = [  # largest first: one buffer serves every gathered batch
        (list(range(0, 22, 2)), list(range(11)), True),
        (list(range(1, 19, 2)), list(range(12, 21)), False),
        (NINE_RUNS, list(range(23, 14, -1)), True),
        ([3, 4, 5], [0, 1, 2], False),  # one run: straight from the pool, no buffer
    ]
    for layer, (src_ids, dst_ids, is_inference) in enumerate(sends):
        with torch.inference_mode(is_inference):  # as layer-wise (in a forward) or not
            send(wire, sender, layer % 2, src_ids, dst_ids)
        msg, frames = wire.receive()
        assert KVReceiver(pool).write_layer(msg, frames)
        expected = copied(expected, src, layer % 2, src_ids, dst_ids)
        assert same_bits(pool, expected)
        sender.flush()  # ZeroMQ is done with it: the next send may reuse it
        assert sender._in_flight == {}
    assert len(sender._kept) == 1


def test_a_gather_buffer_still_in_flight_is_never_reused(wire):
    """Nothing takes the frames (no decode worker): both batches stay queued, and the
    second is gathered into a new buffer rather than over the first."""
    src = random_pool(BIG, seed=3)
    sender = TcpSender(src, BIG, wire.peers)
    addr = unused_addr()
    send(wire, sender, 0, NINE_RUNS, list(range(9)), addr)
    send(wire, sender, 1, NINE_RUNS, list(range(9)), addr)
    first, second = sender._kept
    assert first.data_ptr() != second.data_ptr()
    gathered = src[0][:, NINE_RUNS].contiguous()  # [2, 9, B, H, D]
    assert tensor_bytes(first) == tensor_bytes(gathered)
    assert not any(t.done for ts in sender._in_flight.values() for t in ts)


def test_flush_returns_once_zeromq_is_done_with_the_pool(wire):
    src = random_pool(BIG, seed=5)
    original = src.clone()
    sender = TcpSender(src, BIG, wire.peers)
    sender.flush()  # nothing sent yet: returns at once
    src_ids, dst_ids = [0, 1, 2, 5], [7, 8, 9, 3]
    send(wire, sender, 0, src_ids, dst_ids)
    (trackers,) = sender._in_flight.values()
    assert len(trackers) == 4  # one tracker per frame: two runs, zero-copy
    sender.flush(timeout_s=5)
    assert sender._in_flight == {}
    src.zero_()  # from the next step on, the scheduler may reuse the blocks
    msg, frames = wire.receive()
    pool = torch.zeros(BIG.shape)
    assert KVReceiver(pool).write_layer(msg, frames)
    assert same_bits(pool, copied(torch.zeros(BIG.shape), original, 0, src_ids, dst_ids))


@pytest.fixture
def dead_peers(monkeypatch):
    """Peers whose sockets give up after 0.1 s and queue one message per decode worker."""
    monkeypatch.setattr(base, "SEND_TIMEOUT_MS", 100)  # read when a socket is made
    ctx = zmq.Context()
    ctx.setsockopt(zmq.SNDHWM, 1)  # a default for the sockets this context makes
    peers = PeerSockets(ctx, linger_ms=0)
    yield peers
    peers.close()
    ctx.term()


def test_a_decode_worker_that_never_comes_up_fails_sends_in_bounded_time(dead_peers, caplog):
    sender = TcpSender(random_pool(BIG, seed=3), BIG, dead_peers)
    dest = destination("tcp", [0, 1], kv_addr=unused_addr())
    assert sender.send_layer(dest, 0, [0, 1], [0, 1]) == 2 * layer_block_bytes(BIG)  # queued
    start = time.monotonic()
    with pytest.raises(TransferError, match="is not taking data"):
        sender.send_layer(dest, 1, [0, 1], [0, 1])
    assert 0.05 < time.monotonic() - start < 2  # the timeout acted, and did not hang
    start = time.monotonic()
    sender.flush(timeout_s=5)  # the peer was given up: its queued frames are discarded
    assert time.monotonic() - start < 0.5 and sender._in_flight == {}
    sender.finish(dest, m.KVDone("t-1", "r1", 1, error="gone"))  # queued or logged, never raises
    with caplog.at_level(logging.WARNING, logger="pdserve.transfer.base"):
        sender.finish(dest, m.KVDone("t-1", "r1", 1, error="gone"))  # the queue is full now
    assert "could not tell" in caplog.text and "t-1" in caplog.text


def test_the_streamer_stops_a_transfer_to_a_decode_worker_that_never_comes_up(dead_peers):
    sender = TcpSender(random_pool(LAYOUT, seed=3), LAYOUT, dead_peers)
    streamer = KVStreamer({"tcp": sender}, LAYOUT.num_layers, LAYOUT.block_size)
    request = make_request(12)
    request.block_ids = [5, 1, 6]
    dest = destination("tcp", [0, 2, 3], kv_addr=unused_addr())
    request.kv_dest = hand_off = HandOff(dest, time.monotonic() + 60)
    start = time.monotonic()
    callback = streamer.begin_step([ScheduledRequest(request, 12, 0)])
    for layer in range(LAYOUT.num_layers):
        callback(layer)
    streamer.end_step()
    assert time.monotonic() - start < 2
    assert hand_off.num_batches == 1  # layer 0 queued, layer 1 refused
    assert "is not taking data" in hand_off.error


def test_a_decode_worker_gone_for_good_does_not_fail_later_flushes(wire):
    sender = TcpSender(random_pool(BIG, seed=3), BIG, wire.peers)
    send(wire, sender, 0, [0, 1], [0, 1], unused_addr())
    with pytest.raises(TransferError):
        sender.flush(timeout_s=0.1)
    send(wire, sender, 0, [2, 3], [0, 1])  # to a live decode worker, which takes it
    msg, frames = wire.receive()
    assert KVReceiver(torch.zeros(BIG.shape)).write_layer(msg, frames)
    sender.flush(timeout_s=0.2)


def test_an_empty_batch_is_a_message_of_its_own(wire):
    sender = TcpSender(random_pool(LAYOUT, seed=3), LAYOUT, wire.peers)
    dest = destination("tcp", [], kv_addr=wire.addr)
    assert sender.send_layer(dest, 0, [], []) == 0
    sender.finish(dest, m.KVDone("t-1", "r1", 1, first_token_id=7))
    assert wire.receive() == (m.KVLayer("t-1", 0, [], xxh3([]), 0, []), [])
    assert wire.receive() == (m.KVDone("t-1", "r1", 1, first_token_id=7), [])
