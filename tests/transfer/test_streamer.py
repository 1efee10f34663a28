"""`block_runs`, and the `KVStreamer`'s choice of blocks per step and its end-of-step flush,
with recording senders instead of sockets."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.engine.scheduler import ScheduledRequest
from pdserve.transfer.base import KVSender, TransferError, block_runs
from pdserve.transfer.streamer import HandOff, KVStreamer
from tests.helpers import make_request
from tests.transfer.helpers import LAYOUT, destination


@pytest.mark.parametrize(
    ("src", "dst", "runs"),
    [
        ([], [], []),
        ([3], [7], [(3, 7, 1)]),
        ([0, 1, 2, 3], [4, 5, 6, 7], [(0, 4, 4)]),
        ([0, 1, 2, 3], [4, 5, 9, 10], [(0, 4, 2), (2, 9, 2)]),  # dst breaks the run
        ([0, 1, 5, 6], [2, 3, 4, 5], [(0, 2, 2), (5, 4, 2)]),  # src breaks the run
        ([3, 2, 1], [0, 1, 2], [(3, 0, 1), (2, 1, 1), (1, 2, 1)]),  # descending: no runs
        ([1, 2], [3, 3], [(1, 3, 1), (2, 3, 1)]),
    ],
)
def test_block_runs(src, dst, runs):
    assert block_runs(src, dst) == runs


def test_block_runs_needs_paired_lists():
    with pytest.raises(ValueError):
        block_runs([1, 2], [3])


class RecordingSender(KVSender):
    """Records `send_layer` and `flush` calls instead of moving bytes."""

    def __init__(self, flush_error: str | None = None) -> None:
        super().__init__(torch.empty(0), LAYOUT, None)
        self.calls: list = []
        self.flush_error = flush_error

    def send_layer(self, dest, layer, src_block_ids, dst_block_ids) -> int:
        self.calls.append((layer, src_block_ids, dst_block_ids))
        return 1

    def flush(self) -> None:
        self.calls.append("flush")
        if self.flush_error is not None:
            raise TransferError(self.flush_error)


def stream(streamer: KVStreamer, *items: tuple) -> None:
    """One step: `(request, start, num_new)` per scheduled request."""
    scheduled = [ScheduledRequest(request, num_new, start) for request, start, num_new in items]
    callback = streamer.begin_step(scheduled)
    for layer in range(LAYOUT.num_layers if callback else 0):
        callback(layer)
    streamer.end_step()


def handed_off(backend: str, dst: list[int], deadline: float = 60):
    """A 10-token request in blocks [5, 1, 6], to be sent to `dst` with `backend`."""
    request = make_request(10)
    request.block_ids = [5, 1, 6]
    request.kv_dest = HandOff(destination(backend, dst), time.monotonic() + deadline)
    return request, request.kv_dest


@pytest.mark.parametrize("layerwise", [True, False])
def test_streamer_sends_each_block_once_full_and_resends_partial_ones(layerwise):
    """...and flushes after each step's last send, before the pool may change."""
    sender = RecordingSender()
    streamer = KVStreamer({"rec": sender}, LAYOUT.num_layers, LAYOUT.block_size, layerwise)
    request, hand_off = handed_off("rec", [0, 2, 3])
    stream(streamer, (request, 0, 6))  # blocks 0 and half of 1
    stream(streamer, (request, 6, 4))  # the rest of 1, and 2
    assert sender.calls == [
        (0, [5, 1], [0, 2]),
        (1, [5, 1], [0, 2]),
        "flush",
        (0, [1, 6], [2, 3]),
        (1, [1, 6], [2, 3]),
        "flush",
    ]
    assert (hand_off.num_sent_blocks, hand_off.num_batches, hand_off.error) == (2, 4, None)


def test_streamer_sends_nothing_for_a_restart_below_the_sent_blocks():
    """A request preempted on the prefill worker restarts from token 0: no empty batches
    (and no flush) until it passes the blocks already sent, then from the first block not
    sent in full."""
    sender = RecordingSender()
    streamer = KVStreamer({"rec": sender}, LAYOUT.num_layers, LAYOUT.block_size)
    request, hand_off = handed_off("rec", [0, 2, 3])
    hand_off.num_sent_blocks = 2
    stream(streamer, (request, 0, 4))
    assert sender.calls == []
    stream(streamer, (request, 4, 6))
    assert sender.calls == [(0, [1, 6], [2, 3]), (1, [1, 6], [2, 3]), "flush"]


@pytest.mark.parametrize(
    ("backend", "dst", "deadline", "error"),
    [
        ("rec", [0, 2], 60, "fewer blocks"),
        ("rec", [0, 2, 3], -1, "reservation expired"),
        ("nixl", [0, 2, 3], 60, "cannot send with backend 'nixl'"),
    ],
)
def test_streamer_stops_a_transfer_it_cannot_make(backend, dst, deadline, error):
    sender = RecordingSender()
    streamer = KVStreamer({"rec": sender}, LAYOUT.num_layers, LAYOUT.block_size)
    request, hand_off = handed_off(backend, dst, deadline)
    stream(streamer, (request, 0, 10))
    assert [call for call in sender.calls if call != "flush"] == []
    assert error in hand_off.error


def test_end_step_flushes_each_used_sender_once_and_no_other():
    used, idle = RecordingSender(), RecordingSender()
    streamer = KVStreamer({"rec": used, "idle": idle}, LAYOUT.num_layers, LAYOUT.block_size)
    a, _ = handed_off("rec", [0, 2, 3])
    b, _ = handed_off("rec", [4, 5, 6])
    stream(streamer, (a, 0, 10), (b, 0, 10))
    assert used.calls.count("flush") == 1 and used.calls[-1] == "flush"
    assert len(used.calls) == 2 * LAYOUT.num_layers + 1
    assert idle.calls == []
    stream(streamer)  # a step without transfers flushes nothing
    assert used.calls.count("flush") == 1


def test_a_failed_flush_fails_the_transfers_of_that_backend_only():
    """Their KV may not have left: the decode worker must recompute, so the error goes
    into `KVDone`; the next step sends nothing more for them."""
    stuck, fine = RecordingSender(flush_error="frames stuck"), RecordingSender()
    streamer = KVStreamer({"stuck": stuck, "rec": fine}, LAYOUT.num_layers, LAYOUT.block_size)
    a, a_off = handed_off("stuck", [0, 2, 3])
    b, b_off = handed_off("rec", [4, 5, 6])
    stream(streamer, (a, 0, 6), (b, 0, 6))
    assert (a_off.error, a_off.num_batches) == ("frames stuck", 2)
    assert (b_off.error, b_off.num_batches) == (None, 2)
    stream(streamer, (a, 6, 4), (b, 6, 4))
    assert len(stuck.calls) == 3  # two layers and one flush, all in the first step
    assert fine.calls[-3:] == [(0, [1, 6], [5, 6]), (1, [1, 6], [5, 6]), "flush"]
