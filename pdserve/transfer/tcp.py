"""The `tcp` backend: any host, KV over ZeroMQ with zero-copy frames.

Per layer and request the prefill worker gathers the source blocks into one contiguous
buffer (`[2, n, block_size, heads, dim]`), checksums it, and hands it to ZeroMQ without a
copy (`copy=False`): the I/O thread streams it while the next layer computes. The decode
worker verifies the checksum and copies the batch into its reserved blocks
(`KVReceiver.write_layer`); a damaged batch fails the transfer and the decode worker
recomputes the prompt itself rather than decode from bad KV.
"""

from __future__ import annotations

import torch
import zmq

from pdserve.ipc.messages import KVDestination, KVLayer, encode
from pdserve.transfer.base import KVSender, block_runs, checksum, register_sender


@register_sender("tcp")
class TcpSender(KVSender):
    sends_messages = True

    def send_layer(
        self, dest: KVDestination, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> int:
        local = self.kv_cache[layer]  # [2, N, B, H, D]
        batch = torch.empty(
            (2, len(src_block_ids), *local.shape[2:]), dtype=local.dtype, device="cpu"
        )
        offset = 0
        for src, _, n in block_runs(src_block_ids, src_block_ids):
            batch[:, offset : offset + n].copy_(local[:, src : src + n])
            offset += n
        data = (
            memoryview(batch.numpy()).cast("B")
            if batch.dtype != torch.bfloat16
            else (memoryview(batch.view(torch.int16).numpy()).cast("B"))
        )
        msg = KVLayer(dest.transfer_id, layer, dst_block_ids, checksum(data), len(data))
        sock = self.peers.get(dest.kv_addr)
        sock.send(encode(msg), zmq.SNDMORE)
        sock.send(data, copy=False)  # ZeroMQ keeps `data` (and so `batch`) alive until sent
        return len(data)
