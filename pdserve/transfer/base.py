"""Moving KV blocks from a prefill worker into the blocks a decode worker reserved.

Two halves, as in vLLM's KV connector:

- `KVSender` (prefill side): `send_layer` is called as soon as a layer of the forward pass
  has written its keys and values, with the request's source blocks in the local pool and
  the destination blocks on the decode worker; `finish` tells the decode worker the
  transfer is complete (or abandoned) with a `KVDone`, which always travels over ZeroMQ
  to the decode worker's KV socket, after every data batch of the same transfer.
- `KVReceiver` (decode side): verifies and writes data batches that arrive as messages
  (`tcp`), dequantising int8 batches into the pool's dtype, and is told nothing for
  backends that write in place (`shm`, `nixl`; these always move full precision).

Backends register by name in `SENDERS` (`register_sender`); `backends.py` imports the
built-in ones and makes a sender by name; a decode worker lists the backends it accepts in
its `Register` message. Every byte count returned is what crossed the boundary.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable

import torch
import xxhash
import zmq

from pdserve.ipc import security
from pdserve.ipc.messages import KVDestination, KVDone, KVLayer, KVLayout, encode
from pdserve.kv import int8

logger = logging.getLogger(__name__)

SEND_TIMEOUT_MS = 5000
WIRE_DTYPES = (None, "int8")  # KVLayer.wire_dtype: the pool's own dtype, or kv/int8.py


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Split paired block lists into runs `(src_start, dst_start, length)` in which both
    sides are consecutive: one slice copy per run instead of one per block."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def checksum(data: memoryview | bytes) -> int:
    """The per-batch checksum (xxh3, 64-bit): it runs at memory speed, where zlib's
    crc32 (3.5 GB/s measured here) would be slower than loopback TCP."""
    return xxhash.xxh3_64_intdigest(data)


class PeerSockets:
    """One PUSH socket per decode worker KV address, created on first use."""

    def __init__(
        self, ctx: zmq.Context, linger_ms: int = 1000, kv_mac: security.KVMac | None = None
    ) -> None:
        self.ctx = ctx
        self.linger_ms = linger_ms
        self.kv_mac = kv_mac  # kv_transport_security "mac": plain sockets, messages MAC'd
        self._sockets: dict[str, zmq.Socket] = {}

    def get(self, addr: str) -> zmq.Socket:
        sock = self._sockets.get(addr)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            if self.kv_mac is not None:
                sock = security.MacSocket(security.plain(sock), self.kv_mac)
            sock.setsockopt(zmq.LINGER, self.linger_ms)
            # A dead decode worker must not block the prefill loop for ever: a send that
            # cannot be queued within this time raises zmq.Again (a TransferError).
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            sock.connect(addr)
            self._sockets[addr] = sock
        return sock

    def drop(self, addr: str) -> None:
        """Close a peer's socket, discarding what is queued for it."""
        sock = self._sockets.pop(addr, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


class KVSender(abc.ABC):
    """Prefill side of one backend. `kv_cache` is the local pool, shaped per `layout`."""

    name: str
    sends_messages: bool = False  # data travels as KVLayer messages the receiver counts

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, peers: PeerSockets) -> None:
        self.kv_cache = kv_cache
        self.layout = layout
        self.peers = peers

    @abc.abstractmethod
    def send_layer(
        self, dest: KVDestination, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> int:
        """Send one layer's keys and values of `src_block_ids` (local) into
        `dst_block_ids` (remote). Returns the bytes moved; raises `TransferError`."""

    def flush(self) -> None:
        """Return once nothing sent so far still reads the local pool (end of a step)."""
        return None

    def finish(self, dest: KVDestination, done: KVDone) -> None:
        try:
            self.peers.get(dest.kv_addr).send(encode(done))
        except zmq.Again:
            logger.warning(
                "could not tell %s that transfer %s ended", dest.kv_addr, done.transfer_id
            )

    def close(self) -> None:
        """Release backend resources (mapped pools, registrations)."""
        return None


class TransferError(Exception):
    """A transfer cannot proceed (destination missing, incompatible or not answering).
    `addrs`: the decode workers' KV addresses concerned, when known."""

    def __init__(self, message: str, addrs: list[str] | None = None) -> None:
        super().__init__(message)
        self.addrs = addrs or []


class KVReceiver:
    """Decode side: checks and writes data batches into the local pool."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache  # [L, 2, N, B, H, D]

    def write_layer(self, msg: KVLayer, frames: list[memoryview]) -> bool:
        """Write one batch; False (and nothing written) if it is damaged."""
        num_layers, _, num_blocks = self.kv_cache.shape[:3]
        if not 0 <= msg.layer < num_layers:
            return False
        if (
            any(not 0 <= b < num_blocks for b in msg.block_ids)
            or min(msg.run_lengths, default=0) < 0
        ):
            return False
        if msg.wire_dtype not in WIRE_DTYPES:
            return False
        layer = self.kv_cache[msg.layer]  # [2, N, B, H, D]
        block_shape = layer.shape[2:]
        # NOTE: sizes are checked before `torch.frombuffer`, which raises (rather than
        # returning a short tensor) on an empty buffer or a partial element.
        if not _has_announced_sizes(msg, frames, block_shape, layer.element_size()):
            return False
        digest = xxhash.xxh3_64()
        for frame in frames:
            digest.update(frame)
        if digest.intdigest() != msg.checksum:
            return False
        if msg.wire_dtype == "int8":
            self._write_int8(layer, msg, frames)
            return True
        offset = 0
        for i, n in enumerate(msg.run_lengths):
            if n == 0:
                continue
            dst_ids = msg.block_ids[offset : offset + n]
            offset += n
            for kv in (0, 1):
                data = torch.frombuffer(frames[2 * i + kv], dtype=layer.dtype)
                _write_blocks(layer[kv], data.view(n, *block_shape), dst_ids)
        return True

    @staticmethod
    def _write_int8(layer: torch.Tensor, msg: KVLayer, frames: list[memoryview]) -> None:
        """Dequantise an int8 batch into the pool's dtype (frames as in `KVLayer`)."""
        block_shape = layer.shape[2:]  # [B, H, D]
        num_blocks = len(msg.block_ids)
        scales = torch.frombuffer(frames[-1], dtype=int8.SCALE_DTYPE)
        scales = scales.view(2, num_blocks, block_shape[1]).to(layer.device)
        offset = 0
        for i, n in enumerate(msg.run_lengths):
            if n == 0:
                continue
            dst_ids = msg.block_ids[offset : offset + n]
            for kv in (0, 1):
                q = torch.frombuffer(frames[2 * i + kv], dtype=torch.int8).view(n, *block_shape)
                data = int8.dequantize(
                    q.to(layer.device), scales[kv, offset : offset + n], layer.dtype
                )
                _write_blocks(layer[kv], data, dst_ids)
            offset += n


def _has_announced_sizes(
    msg: KVLayer, frames: list[memoryview], block_shape: torch.Size, itemsize: int
) -> bool:
    """Frame count and sizes match the header: two frames per run (keys, values), plus one
    of scales for int8, and `num_bytes` in all."""
    runs = msg.run_lengths
    if sum(runs) != len(msg.block_ids):
        return False
    if msg.wire_dtype == "int8":
        num_heads = block_shape[1]
        sizes = [n * _numel(block_shape) for n in runs for _ in (0, 1)]
        sizes.append(2 * len(msg.block_ids) * num_heads * int8.SCALE_DTYPE.itemsize)
    else:
        sizes = [n * _numel(block_shape) * itemsize for n in runs for _ in (0, 1)]
    return [len(f) for f in frames] == sizes and sum(sizes) == msg.num_bytes


def _write_blocks(pool: torch.Tensor, data: torch.Tensor, dst_ids: list[int]) -> None:
    """Copy `data` `[n, B, H, D]` into blocks `dst_ids` of `pool` `[N, B, H, D]`."""
    for src, dst, length in block_runs(list(range(len(dst_ids))), dst_ids):
        pool[dst : dst + length].copy_(data[src : src + length])


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


SENDERS: dict[str, Callable[..., KVSender]] = {}


def register_sender(name: str) -> Callable[[type[KVSender]], type[KVSender]]:
    def wrap(cls: type[KVSender]) -> type[KVSender]:
        cls.name = name
        SENDERS[name] = cls
        return cls

    return wrap
