"""The `tcp` backend: any host, KV over ZeroMQ with zero-copy frames.

Per layer and request, each run of consecutive source blocks goes out as two frames — its
keys and its values, which are contiguous in the pool — handed to ZeroMQ without a copy
(`copy=False`); the I/O thread streams them while the next layer computes. A request whose
blocks are scattered into many runs is gathered into one buffer first instead (many tiny
frames cost more than one copy). A checksum (xxh3) over the batch's frames travels in the
`KVLayer` header. The decode worker verifies it and copies the frames into its reserved
blocks (`KVReceiver.write_layer`); a damaged batch fails the transfer and the decode worker
recomputes the prompt itself rather than decode from bad KV.

NOTE: frames point into the local pool until ZeroMQ has sent them. `flush()` waits for
that; the streamer calls it at the end of every step, before the scheduler may reuse the
blocks or the next chunk rewrites a partly filled one.

Opt-in int8 wire (`KVDestination.wire_dtype == "int8"`): each batch's blocks are
quantised (`kv/int8.py`: int8 values, a float32 scale per block, layer, K/V and head) and
go as one run: keys, values and a scales frame; the receiver dequantises into its pool's
dtype. That is 0.5x the bytes of a bfloat16 pool and 0.25x of a float32 one (plus the
scales, 4 bytes per `block_size * head_dim` values), at the cost of a quantisation pass on
the sender and a lossy KV (measured in benchmarks/int8_kv.py). Quantising makes new
tensors, so these batches never point into the pool.

Gather buffers are reused once ZeroMQ reports them sent (`track=True`): a fresh multi-MiB
buffer per layer pays a page fault per 4 KiB page on first touch.
"""

from __future__ import annotations

import time

import torch
import xxhash
import zmq

from pdserve.ipc.messages import KVDestination, KVLayer, encode
from pdserve.kv import int8
from pdserve.transfer.base import KVSender, TransferError, block_runs, register_sender

MAX_ZERO_COPY_RUNS = 8  # more runs than this: gather into one buffer first
MAX_KEPT_BUFFERS = 32
MAX_KEPT_BYTES = 256 * 2**20


@register_sender("tcp")
class TcpSender(KVSender):
    sends_messages = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Gather buffers, oldest first; reusable once every frame in flight is sent.
        self._kept: list[torch.Tensor] = []
        # Trackers of frames not yet sent, per decode worker address.
        self._in_flight: dict[str, list[zmq.MessageTracker]] = {}

    @torch.inference_mode()  # buffers made during a forward pass are inference tensors
    def send_layer(
        self, dest: KVDestination, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> int:
        local = self.kv_cache[layer]  # [2, N, B, H, D]
        runs = [(s, n) for s, _, n in block_runs(src_block_ids, src_block_ids)]
        if dest.wire_dtype == "int8":
            frames = _quantized_frames(local, runs)
            run_lengths = [len(src_block_ids)]
        elif len(runs) <= MAX_ZERO_COPY_RUNS:
            frames = [_bytes(local[kv, s : s + n]) for s, n in runs for kv in (0, 1)]
            run_lengths = [n for _, n in runs]
        else:
            frames = self._gather(local, runs, len(src_block_ids))
            run_lengths = [len(src_block_ids)]
        digest = xxhash.xxh3_64()
        for frame in frames:
            digest.update(frame)
        num_bytes = sum(len(f) for f in frames)
        msg = KVLayer(
            dest.transfer_id,
            layer,
            dst_block_ids,
            digest.intdigest(),
            num_bytes,
            run_lengths,
            dest.wire_dtype,
        )
        sock = self.peers.get(dest.kv_addr)
        trackers = self._in_flight.setdefault(dest.kv_addr, [])
        try:
            sock.send(encode(msg), zmq.SNDMORE if frames else 0)
            for i, frame in enumerate(frames):
                more = zmq.SNDMORE if i < len(frames) - 1 else 0
                trackers.append(sock.send(frame, more, copy=False, track=True))
        except zmq.Again as e:
            self._give_up(dest.kv_addr)
            raise TransferError(
                f"{dest.kv_addr} is not taking data (worker gone?)", [dest.kv_addr]
            ) from e
        return num_bytes

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until ZeroMQ has sent every frame (they point into the pool). A peer that
        does not take its frames in time is given up: its queue is dropped, and the
        `TransferError` names it so only transfers to it fail."""
        failed = []
        deadline = time.monotonic() + timeout_s
        for addr, trackers in list(self._in_flight.items()):
            try:
                for tracker in trackers:
                    tracker.wait(max(0.0, deadline - time.monotonic()))
            except zmq.NotDone:
                failed.append(addr)
                self._give_up(addr)
            else:
                del self._in_flight[addr]
        if failed:
            raise TransferError(f"KV frames not sent in time to {failed} (worker gone?)", failed)

    def _give_up(self, addr: str) -> None:
        """Forget a peer's unsent frames; closing its socket discards them."""
        self._in_flight.pop(addr, None)
        self.peers.drop(addr)

    def _gather(self, local: torch.Tensor, runs, num_blocks: int) -> list[memoryview]:
        block_bytes = local[0, 0].numel() * local.element_size()
        num_bytes = 2 * num_blocks * block_bytes
        buffer = self._take_buffer(num_bytes)
        batch = buffer[:num_bytes].view(local.dtype).view(2, num_blocks, *local.shape[2:])
        offset = 0
        for s, n in runs:
            batch[:, offset : offset + n].copy_(local[:, s : s + n])
            offset += n
        self._keep(buffer)
        return [_bytes(batch[0]), _bytes(batch[1])]

    def _take_buffer(self, num_bytes: int) -> torch.Tensor:
        """The smallest kept buffer that fits once nothing is in flight, else a new one."""
        is_sending = any(not t.done for ts in self._in_flight.values() for t in ts)
        fits = [i for i, b in enumerate(self._kept) if b.numel() >= num_bytes]
        if fits and not is_sending:
            return self._kept.pop(min(fits, key=lambda i: self._kept[i].numel()))
        return torch.empty(num_bytes, dtype=torch.uint8)

    def _keep(self, buffer: torch.Tensor) -> None:
        """Remember a buffer for reuse; forget the oldest past the caps (ZeroMQ keeps
        one still in flight alive until sent)."""
        self._kept.append(buffer)
        while len(self._kept) > 1 and (
            len(self._kept) > MAX_KEPT_BUFFERS
            or sum(b.numel() for b in self._kept) > MAX_KEPT_BYTES
        ):
            self._kept.pop(0)

    def close(self) -> None:
        self._kept.clear()
        self._in_flight.clear()


def _quantized_frames(local: torch.Tensor, runs: list[tuple[int, int]]) -> list[memoryview]:
    """A layer's blocks (`runs` of `local` `[2, N, B, H, D]`) as int8: keys, values and
    their scales `[2, n, H]`, three frames of fresh tensors (ZeroMQ keeps them alive)."""
    if len(runs) == 1:
        s, n = runs[0]
        blocks = local[:, s : s + n]  # [2, n, B, H, D], a view
    else:
        ids = torch.cat([torch.arange(s, s + n) for s, n in runs]).to(local.device)
        blocks = local.index_select(1, ids)
    q, scales = int8.quantize(blocks)  # [2, n, B, H, D] int8, [2, n, H] float32
    return [_bytes(q[0].cpu()), _bytes(q[1].cpu()), _bytes(scales.cpu())]


def _bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, without a copy (numpy has no bfloat16: view as int16)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")
