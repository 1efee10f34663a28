"""Delta hand-over on the prefill side: blocks the destination already holds (its prefix
cache, `KVDestination.first_block`) are never sent, whatever the chunking."""

from __future__ import annotations

import time

from pdserve.transfer.streamer import HandOff, KVStreamer
from tests.helpers import make_request
from tests.transfer.helpers import LAYOUT, destination
from tests.transfer.test_streamer import RecordingSender, stream


def test_blocks_before_first_block_are_skipped_and_the_rest_map_onto_dest():
    sender = RecordingSender()
    streamer = KVStreamer({"rec": sender}, LAYOUT.num_layers, LAYOUT.block_size)
    request = make_request(10)  # blocks of 4 tokens: [5, 1, 6]
    request.block_ids = [5, 1, 6]
    dest = destination("rec", [8], first_block=2)  # blocks 0 and 1 are at the destination
    request.kv_dest = hand_off = HandOff(dest, time.monotonic() + 60)
    stream(streamer, (request, 0, 6))  # blocks 0 and half of 1: nothing to send
    assert sender.calls == []
    stream(streamer, (request, 6, 4))  # the rest of 1 (skipped), and 2 → dest block 8
    assert sender.calls == [(0, [6], [8]), (1, [6], [8]), "flush"]
    assert (hand_off.num_sent_blocks, hand_off.num_batches, hand_off.error) == (2, 2, None)


def test_too_few_destination_blocks_past_first_block_is_an_error():
    sender = RecordingSender()
    streamer = KVStreamer({"rec": sender}, LAYOUT.num_layers, LAYOUT.block_size)
    request = make_request(10)
    request.block_ids = [5, 1, 6]
    request.kv_dest = hand_off = HandOff(
        destination("rec", [], first_block=2), time.monotonic() + 60
    )
    stream(streamer, (request, 0, 10))
    assert sender.calls == []
    assert hand_off.error == "the destination holds fewer blocks than the prompt needs"
