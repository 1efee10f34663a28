"""Prefill side: stream each step's newly computed KV to the requests' decode workers.

The engine core calls `begin_step` with the step's scheduled requests and passes the
returned callback to the model, which calls it after every layer: that layer's blocks
leave while the next layer computes (layer-wise streaming). With `layerwise=False`, all
layers are sent after the forward pass instead (kept to measure what streaming buys).

Which blocks: a request's prompt may take several steps (chunked prefill) and may start
from blocks this worker already had cached; each step sends every block from the first
one not yet sent in full up to the one holding the step's last token. A partly filled
block is sent again with the next chunk, complete. Delta hand-over: blocks before
`dest.first_block` are already at the destination (its prefix cache) and are never sent;
the prefill worker still computes them (or takes them from its own prefix cache), since
the rest of the prompt attends to them.

A failed send (destination gone, deadline passed) stops that request's transfer; the
worker then reports it in the `KVDone` it sends after the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pdserve.ipc.messages import KVDestination
from pdserve.transfer.base import KVSender, TransferError


@dataclass(slots=True)
class HandOff:
    """What a prefill worker attaches to a request (`Request.kv_dest`)."""

    dest: KVDestination
    deadline: float  # time.monotonic(); the decode worker may reuse the blocks after it
    num_sent_blocks: int = 0  # leading blocks already sent in full
    num_bytes: int = 0
    num_batches: int = 0
    seconds: float = 0.0
    error: str | None = None


class _StepRequest(Protocol):
    kv_dest: object  # a `HandOff` on requests whose KV leaves this worker
    block_ids: list[int]


class StepItem(Protocol):
    """What the streamer reads of one scheduled request (the engine's `ScheduledRequest`):
    declared here so `transfer/` stays below `engine/`."""

    request: _StepRequest
    start: int  # tokens [start, start + num_new_tokens) are computed this step
    num_new_tokens: int


@dataclass(slots=True)
class _Job:
    hand_off: HandOff
    src_block_ids: list[int]
    dst_block_ids: list[int]


class KVStreamer:
    def __init__(
        self,
        senders: dict[str, KVSender],
        num_layers: int,
        block_size: int,
        layerwise: bool = True,
    ) -> None:
        self.senders = senders  # by backend name
        self.num_layers = num_layers
        self.block_size = block_size
        self.layerwise = layerwise
        self._jobs: list[_Job] = []

    def begin_step(self, scheduled: Sequence[StepItem]) -> Callable[[int], None] | None:
        self._jobs = [job for item in scheduled if (job := self._job(item)) is not None]
        if not self._jobs or not self.layerwise:
            return None
        return self._send_layer

    def end_step(self) -> None:
        if not self.layerwise:
            for layer in range(self.num_layers):
                self._send_layer(layer)
        if self._jobs:
            self._flush()
        self._jobs = []

    def abandon_step(self) -> None:
        """The step failed: send nothing more of it (its requests are being aborted), but
        wait until what was sent no longer reads the pool."""
        if self._jobs:
            self._flush()
        self._jobs = []

    def _flush(self) -> None:
        """Wait until sent data no longer reads the pool: the scheduler may reuse these
        blocks, or the next chunk rewrite a partly filled one, from the next step on."""
        for name in {job.hand_off.dest.backend for job in self._jobs}:
            sender = self.senders.get(name)
            if sender is None:
                continue
            try:
                sender.flush()
            except TransferError as e:
                for job in self._jobs:
                    dest = job.hand_off.dest
                    failed = dest.backend == name and (not e.addrs or dest.kv_addr in e.addrs)
                    if failed and job.hand_off.error is None:
                        job.hand_off.error = str(e)

    def _job(self, item: StepItem) -> _Job | None:
        hand_off = item.request.kv_dest
        if not isinstance(hand_off, HandOff) or hand_off.error is not None:
            return None
        skip = hand_off.dest.first_block
        first = max(hand_off.num_sent_blocks, skip)
        end = item.start + item.num_new_tokens
        last = -(-end // self.block_size)  # blocks holding tokens [0, end)
        hand_off.num_sent_blocks = max(skip, end // self.block_size)
        src_block_ids = item.request.block_ids[first:last]
        dst_block_ids = hand_off.dest.block_ids[first - skip : max(first, last) - skip]
        if len(dst_block_ids) != len(src_block_ids):
            hand_off.error = "the destination holds fewer blocks than the prompt needs"
            return None
        if not src_block_ids:
            # Still inside the destination's cached prefix, or a request preempted here
            # restarting below the blocks already sent: nothing new to send (and an
            # empty batch is not worth a message).
            return None
        return _Job(hand_off, src_block_ids, dst_block_ids)

    def _send_layer(self, layer: int) -> None:
        for job in self._jobs:
            hand_off = job.hand_off
            if hand_off.error is not None:
                continue
            start = time.perf_counter()
            if time.monotonic() > hand_off.deadline:
                hand_off.error = "the decode worker's reservation expired before the KV was sent"
                continue
            sender = self.senders.get(hand_off.dest.backend)
            if sender is None:
                hand_off.error = f"this worker cannot send with backend {hand_off.dest.backend!r}"
                continue
            try:
                sent = sender.send_layer(hand_off.dest, layer, job.src_block_ids, job.dst_block_ids)
            except TransferError as e:
                hand_off.error = str(e)
                continue
            hand_off.num_bytes += sent
            hand_off.num_batches += 1
            hand_off.seconds += time.perf_counter() - start
