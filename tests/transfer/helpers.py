"""Builders shared by the transfer tests and `tests/worker/test_handoff.py`.

- `LAYOUT`: a small pool (2 layers, 8 blocks of 4 tokens, 2 heads of 8, float32) for the
  byte-level tests; `layer_block_bytes` is one block's keys and values in one layer.
- `Wire`: a decode worker's KV socket (PULL, bound) and a prefill worker's `PeerSockets`.
- `random_pool`, `same_bits`, `copied`: seeded pools and bit-exact comparisons.
- `xxh3`: the tcp wire format's checksum, written out from its definition (xxh3_64 over a
  batch's raw frames, in order), so the tests do not trust the code under test for it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

import torch
import xxhash
import zmq

from pdserve.ipc import messages as m
from pdserve.transfer.base import PeerSockets
from pdserve.transfer.shm import TORCH_DTYPES

LAYOUT = m.KVLayout(
    num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32"
)


def layer_block_bytes(layout: m.KVLayout) -> int:
    """Keys and values of one block in one layer."""
    itemsize = TORCH_DTYPES[layout.dtype].itemsize
    return 2 * layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize


class Wire:
    """A decode worker's KV socket (PULL, bound) and a prefill worker's peers (PUSH)."""

    def __init__(self, kv_mac=None) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVTIMEO, 5000)  # a missing message fails, never hangs
        self.addr = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
        self.peers = PeerSockets(self.ctx, linger_ms=0, kv_mac=kv_mac)  # MAC'd when given

    def receive(self) -> tuple[m.Message, list[memoryview]]:
        frames = self.pull.recv_multipart(copy=False)
        return m.decode(frames[0].buffer), [f.buffer for f in frames[1:]]

    def is_empty(self) -> bool:
        return not self.pull.poll(50)

    def close(self) -> None:
        self.peers.close()
        self.pull.close()
        self.ctx.term()


def unused_addr() -> str:
    """A loopback address nothing listens on: a decode worker that never comes up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def random_pool(layout: m.KVLayout, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape, generator=gen).to(TORCH_DTYPES[layout.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def copied(pool: torch.Tensor, src: torch.Tensor, layer: int, src_ids, dst_ids) -> torch.Tensor:
    """`pool` as it should be after copying `src_ids` of `src` into `dst_ids`, one layer."""
    out = pool.clone()
    out[layer][:, dst_ids] = src[layer][:, src_ids]
    return out


def xxh3(frames: Iterable[bytes | memoryview]) -> int:
    digest = xxhash.xxh3_64()
    for frame in frames:
        digest.update(frame)
    return digest.intdigest()


def destination(backend: str, block_ids: list[int], **kw) -> m.KVDestination:
    kw.setdefault("kv_addr", "tcp://127.0.0.1:1")
    return m.KVDestination("decode-0", "t-1", block_ids, backend=backend, **kw)
