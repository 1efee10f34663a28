"""One KV block as the tiers hold it, and its self-checking byte format.

A `StoredBlock` is one block's keys and values across all layers, `[L, 2, B, H, D]`, on the
host, plus the token ids it covers (a hit is verified against them, as the device prefix
cache does) and its hash. It is either raw, in the model's dtype, or int8 with one float32
scale per (layer, k/v, head) (`pdserve.kv.int8`). No parent hash is kept: a lookup walks
the request's own hash chain, whose hashes already cover every earlier token.

The byte format (disk files and Redis values) is one little-endian header followed by a
payload, all covered by one xxh64 checksum:

    magic "PDKV" | version u16 | encoding u8 | dtype u8 | block_hash u64 | model_id u64
    | num_layers u32 | num_kv_heads u32 | head_dim u32 | block_size u32
    | payload_len u64 | checksum u64
    payload: token ids (block_size × i64), then the values ([L,2,B,H,D] in the dtype, or
             int8), then for int8 the scales ([L,2,H] float32)

The layout fields let a reader reject a block written for another model or block size
before touching its payload. With a `secret` (the Redis tier, shared by every worker of a
cluster: `ipc/security.py` derives it from the cluster key), the checksum is a keyed
BLAKE2b-64 MAC instead of xxh64, so a block written into a shared server by anyone without
the secret fails verification like a corrupt one. Block hashes cover token ids only, so `model_id` (a
fingerprint of the model's config and weights, see `fingerprint.py`) is part of the layout:
two checkpoints of one shape never read each other's KV; `decode` raises `CorruptBlockError` for any mismatch, short
read or checksum failure, and the caller drops the block (a miss, never wrong KV).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch
import xxhash

from pdserve.errors import PdserveError
from pdserve.kv import int8
from pdserve.kv.block_hash import BlockHash

MAGIC = b"PDKV"
FORMAT_VERSION = 1
RAW, INT8 = 0, 1
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
# magic, version, encoding, dtype, hash, model_id, layers, heads, head_dim, block_size,
# payload_len, checksum
_HEADER = struct.Struct("<4sHBBQQIIIIQQ")
HEADER_SIZE = _HEADER.size
_CHECKSUM_OFFSET = HEADER_SIZE - 8


class CorruptBlockError(PdserveError):
    """Bytes that are not a valid block for this layout (truncated, altered, foreign)."""


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """The shape every block of one engine has; blocks of another layout never mix in."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    model_id: int = 0  # fingerprint of the weights (`fingerprint.model_fingerprint`)

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def scales_shape(self) -> tuple[int, ...]:
        return int8.scales_shape(self.kv_shape)


@dataclass(frozen=True, slots=True)
class StoredBlock:
    block_hash: BlockHash
    token_ids: tuple[int, ...]
    kv: torch.Tensor  # [L, 2, B, H, D] on the host: the model's dtype, or int8 with scales
    scales: torch.Tensor | None = None  # [L, 2, H] float32 when kv is int8

    @property
    def is_int8(self) -> bool:
        return self.scales is not None

    @property
    def nbytes(self) -> int:
        scale_bytes = 0 if self.scales is None else self.scales.nbytes
        return self.kv.nbytes + scale_bytes + 8 * len(self.token_ids)

    def to_kv(self, dtype: torch.dtype) -> torch.Tensor:
        """The block's KV in `dtype` (dequantised if int8), `[L, 2, B, H, D]`."""
        if self.scales is None:
            return self.kv if self.kv.dtype == dtype else self.kv.to(dtype)
        return int8.dequantize(self.kv, self.scales, dtype)

    def quantized(self) -> StoredBlock:
        """This block in int8 (itself if it already is)."""
        if self.scales is not None:
            return self
        q, scales = int8.quantize(self.kv)
        return StoredBlock(self.block_hash, self.token_ids, q, scales)


def encode(block: StoredBlock, layout: BlockLayout, secret: bytes | None = None) -> bytes:
    """The block as one self-describing, checksummed (with `secret`: MACed) byte string."""
    parts = [torch.tensor(block.token_ids, dtype=torch.int64), block.kv]
    if block.scales is not None:
        parts.append(block.scales)
    payload = b"".join(_tensor_bytes(t) for t in parts)
    header = _pack_header(block, layout, len(payload), checksum=0)
    checksum = _checksum(header[:_CHECKSUM_OFFSET], payload, secret)
    return header[:_CHECKSUM_OFFSET] + checksum.to_bytes(8, "little") + payload


def decode(
    data: bytes | bytearray | memoryview, layout: BlockLayout, secret: bytes | None = None
) -> StoredBlock:
    """Parse and verify `data`; raise `CorruptBlockError` if it is not a whole, intact
    block of `layout` (written with the same `secret`)."""
    header = read_header(data, layout)
    payload = memoryview(data)[HEADER_SIZE:]
    if len(payload) != header.payload_len:
        raise CorruptBlockError(
            f"payload is {len(payload)} bytes, header says {header.payload_len}"
        )
    if _checksum(bytes(data[:_CHECKSUM_OFFSET]), payload, secret) != header.checksum:
        raise CorruptBlockError("checksum mismatch")
    buffer = bytearray(payload)  # writable: torch.frombuffer would warn on read-only bytes
    n = layout.block_size
    token_ids = tuple(torch.frombuffer(buffer, dtype=torch.int64, count=n).tolist())
    offset = 8 * n
    if header.encoding == RAW:
        kv = _tensor_at(buffer, offset, layout.dtype, layout.kv_shape)
        return StoredBlock(header.block_hash, token_ids, kv)
    q = _tensor_at(buffer, offset, torch.int8, layout.kv_shape)
    offset += q.nbytes
    scales = _tensor_at(buffer, offset, int8.SCALE_DTYPE, layout.scales_shape)
    return StoredBlock(header.block_hash, token_ids, q, scales)


@dataclass(frozen=True, slots=True)
class Header:
    encoding: int
    block_hash: BlockHash
    payload_len: int
    checksum: int

    @property
    def total_size(self) -> int:
        return HEADER_SIZE + self.payload_len


def read_header(data: bytes | bytearray | memoryview, layout: BlockLayout) -> Header:
    """The header of `data`, checked against `layout` (payload not verified)."""
    if len(data) < HEADER_SIZE:
        raise CorruptBlockError(f"{len(data)} bytes is shorter than a header")
    fields = _HEADER.unpack_from(data)
    magic, version, encoding, dtype_code, block_hash, model_id, *shape, payload_len, checksum = (
        fields
    )
    if magic != MAGIC:
        raise CorruptBlockError("not a pdserve KV block (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptBlockError(f"format version {version}, this build reads {FORMAT_VERSION}")
    expected = [layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size]
    if shape != expected or _CODE_DTYPES.get(dtype_code) != layout.dtype:
        raise CorruptBlockError(f"layout {shape}/{dtype_code} is not this engine's {expected}")
    if model_id != layout.model_id:
        raise CorruptBlockError(f"written for model {model_id:#x}, not {layout.model_id:#x}")
    if encoding not in (RAW, INT8) or payload_len != _payload_len(layout, encoding):
        raise CorruptBlockError(f"encoding {encoding} with {payload_len} payload bytes")
    return Header(encoding, BlockHash(block_hash), payload_len, checksum)


def _payload_len(layout: BlockLayout, encoding: int) -> int:
    num_values = layout.num_layers * 2 * layout.block_size * layout.num_kv_heads * layout.head_dim
    tokens = 8 * layout.block_size
    if encoding == RAW:
        return tokens + num_values * layout.dtype.itemsize
    return tokens + int8.num_bytes(layout.kv_shape)


def _pack_header(block: StoredBlock, layout: BlockLayout, payload_len: int, checksum: int) -> bytes:
    if tuple(block.kv.shape) != layout.kv_shape or len(block.token_ids) != layout.block_size:
        raise ValueError(f"block shape {tuple(block.kv.shape)} is not {layout.kv_shape}")
    return _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        INT8 if block.is_int8 else RAW,
        _DTYPE_CODES[layout.dtype],
        block.block_hash,
        layout.model_id,
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
        layout.block_size,
        payload_len,
        checksum,
    )


def _checksum(header: bytes, payload: bytes | memoryview, secret: bytes | None) -> int:
    if secret is None:
        digest = xxhash.xxh64(header)
        digest.update(payload)
        return digest.intdigest()
    mac = hashlib.blake2b(header, key=secret, digest_size=8, person=b"pdserve-kvblock")
    mac.update(payload)
    return int.from_bytes(mac.digest(), "little")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # Viewed as bytes in torch: numpy has no bfloat16.
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().tobytes()


def _tensor_at(
    buffer: bytearray, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    count = 1
    for dim in shape:
        count *= dim
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count * dtype.itemsize, offset=offset)
    return raw.view(dtype).reshape(shape)
