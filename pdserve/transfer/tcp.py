"""The `tcp` backend: any host, KV over ZeroMQ with zero-copy frames.

Per layer and request the prefill worker gathers the source blocks into one contiguous
buffer (`[2, n, block_size, heads, dim]`), checksums it, and hands it to ZeroMQ without a
copy (`copy=False`): the I/O thread streams it while the next layer computes. The decode
worker verifies the checksum and copies the batch into its reserved blocks
(`KVReceiver.write_layer`); a damaged batch fails the transfer and the decode worker
recomputes the prompt itself rather than decode from bad KV.

Gather buffers are reused once ZeroMQ reports it has sent them (`track=True`): a fresh
multi-MiB buffer per layer costs a page fault per 4 KiB on first touch, which measured
here made gathering 2.5x slower than the copy itself (`benchmarks/kv_transfer.py`).
"""

from __future__ import annotations

import torch
import zmq

from pdserve.ipc.messages import KVDestination, KVLayer, encode
from pdserve.transfer.base import KVSender, block_runs, checksum, register_sender

MAX_IDLE_BYTES = 256 * 2**20  # sent buffers kept for reuse beyond this are freed


@register_sender("tcp")
class TcpSender(KVSender):
    sends_messages = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Byte buffers handed to ZeroMQ, oldest first, with the tracker of their last send.
        self._buffers: list[tuple[torch.Tensor, zmq.MessageTracker]] = []

    def send_layer(
        self, dest: KVDestination, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> int:
        local = self.kv_cache[layer]  # [2, N, B, H, D]
        shape = (2, len(src_block_ids), *local.shape[2:])
        num_bytes = local[:, : len(src_block_ids)].numel() * local.element_size()
        buffer = self._take_buffer(num_bytes)
        batch = buffer[:num_bytes].view(local.dtype).view(shape)
        offset = 0
        for src, _, n in block_runs(src_block_ids, src_block_ids):
            batch[:, offset : offset + n].copy_(local[:, src : src + n])
            offset += n
        data = memoryview(buffer[:num_bytes].numpy())
        msg = KVLayer(dest.transfer_id, layer, dst_block_ids, checksum(data), num_bytes)
        sock = self.peers.get(dest.kv_addr)
        sock.send(encode(msg), zmq.SNDMORE)
        # NOTE: ZeroMQ reads `buffer` until the tracker says done; only then is it reused.
        tracker = sock.send(data, copy=False, track=True)
        self._buffers.append((buffer, tracker))
        return num_bytes

    def _take_buffer(self, num_bytes: int) -> torch.Tensor:
        """The smallest sent buffer that fits, or a new one; frees idle ones past the cap."""
        best = None
        for i, (buffer, tracker) in enumerate(self._buffers):
            fits = buffer.numel() >= num_bytes and tracker.done
            if fits and (best is None or buffer.numel() < self._buffers[best][0].numel()):
                best = i
        if best is not None:
            return self._buffers.pop(best)[0]
        idle = sum(b.numel() for b, t in self._buffers if t.done)
        while idle > MAX_IDLE_BYTES:
            i = next(i for i, (_, t) in enumerate(self._buffers) if t.done)
            idle -= self._buffers.pop(i)[0].numel()
        return torch.empty(num_bytes, dtype=torch.uint8)

    def close(self) -> None:
        self._buffers.clear()
