"""The tcp backend's opt-in int8 wire format (`KVDestination.wire_dtype="int8"`).

- a batch is one `KVLayer` (`wire_dtype="int8"`, one run) and three frames: int8 keys,
  int8 values, float32 scales `[2, n, heads]`; byte counts exact: 0.5x of a bfloat16 pool
  and 0.25x of a float32 one, plus the scales;
- the receiver writes exactly `dequantize(quantize(source blocks))` in its pool's dtype into
  the destination blocks, and nothing else, however the ids are scattered;
- a damaged int8 batch (frames missing, scales short, a flipped bit, an unknown wire
  dtype) is refused and writes nothing;
- the router's `kv_wire_dtype` setting is validated and reaches tcp destinations only.
"""

from __future__ import annotations

import msgspec
import pytest
import torch

from pdserve.errors import ConfigError
from pdserve.ipc import messages as m
from pdserve.kv import int8
from pdserve.router.dispatch import Dispatcher
from pdserve.router.policy import RoutingConfig
from pdserve.serve import ServeConfig
from pdserve.transfer.base import KVReceiver
from pdserve.transfer.tcp import TcpSender
from tests.transfer.helpers import (
    LAYOUT,
    Wire,
    destination,
    layer_block_bytes,
    random_pool,
    same_bits,
    xxh3,
)

POOL = msgspec.structs.replace(LAYOUT, num_blocks=24)
SENDS = {  # source ids, destination ids
    "one-run": ([0, 1, 2, 3], [4, 5, 6, 7]),
    "three-runs": ([5, 6, 2, 3, 7], [1, 5, 6, 3, 0]),
    "scattered": (list(range(0, 18, 2)), list(range(23, 14, -1))),
}


def int8_layer_bytes(layout: m.KVLayout, num_blocks: int) -> int:
    """One layer's keys and values of `num_blocks` blocks as int8, plus their scales."""
    values = 2 * num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim
    return values + 2 * num_blocks * layout.num_kv_heads * 4


def send_int8(wire: Wire, src: torch.Tensor, layout, layer, src_ids, dst_ids):
    dest = destination("tcp", dst_ids, kv_addr=wire.addr, wire_dtype="int8")
    num_bytes = TcpSender(src, layout, wire.peers).send_layer(dest, layer, src_ids, dst_ids)
    msg, frames = wire.receive()
    return num_bytes, msg, frames


def expected_pool(before, src, layer, src_ids, dst_ids) -> torch.Tensor:
    """`before` with the int8 round trip of `src`'s blocks written into `dst_ids`."""
    out = before.clone()
    q, scales = int8.quantize(src[layer][:, src_ids])
    out[layer][:, dst_ids] = int8.dequantize(q, scales, src.dtype)
    return out


@pytest.mark.parametrize("case", SENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_batch_format_and_exact_bytes(wire, dtype, case):
    layout = msgspec.structs.replace(POOL, dtype=dtype)
    src_ids, dst_ids = SENDS[case]
    src = random_pool(layout, seed=3)
    num_bytes, msg, frames = send_int8(wire, src, layout, 1, src_ids, dst_ids)
    n = len(src_ids)
    assert num_bytes == int8_layer_bytes(layout, n) == sum(len(f) for f in frames)
    assert msg == m.KVLayer("t-1", 1, dst_ids, xxh3(frames), num_bytes, [n], "int8")
    q, scales = int8.quantize(src[1][:, src_ids])
    assert [bytes(f) for f in frames] == [
        q[0].numpy().tobytes(),
        q[1].numpy().tobytes(),
        scales.numpy().tobytes(),
    ]


def test_wire_bytes_ratio_vs_the_pools_dtype():
    """Per block and layer of the test layout (4 tokens, 2 heads of 8): int8 values are
    half of bfloat16 and a quarter of float32; the scales add 2 heads x 4 bytes per K/V."""
    int8_bytes = int8_layer_bytes(POOL, 1)
    assert int8_bytes == 2 * 4 * 2 * 8 + 2 * 2 * 4
    bf16 = layer_block_bytes(msgspec.structs.replace(POOL, dtype="bfloat16"))
    fp32 = layer_block_bytes(POOL)
    assert (int8_bytes - 16) / bf16 == 0.5 and (int8_bytes - 16) / fp32 == 0.25


@pytest.mark.parametrize("case", SENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_receiver_dequantises_into_the_destination_blocks_only(wire, dtype, case):
    layout = msgspec.structs.replace(POOL, dtype=dtype)
    src_ids, dst_ids = SENDS[case]
    src = random_pool(layout, seed=3)
    _, msg, frames = send_int8(wire, src, layout, 1, src_ids, dst_ids)
    pool = random_pool(layout, seed=4)
    before = pool.clone()
    assert KVReceiver(pool).write_layer(msg, frames)
    assert same_bits(pool, expected_pool(before, src, 1, src_ids, dst_ids))
    # and within the int8 error bound of the source (float32: half a step per element)
    if dtype == "float32":
        _, scales = int8.quantize(src[1][:, src_ids])
        error = (pool[1][:, dst_ids] - src[1][:, src_ids]).abs()
        assert torch.all(error <= scales[:, :, None, :, None] / 2 * (1 + 1e-5))


def flipped(frame: memoryview, index: int) -> memoryview:
    data = bytearray(frame)
    data[index] ^= 0x01
    return memoryview(data)


def test_damaged_int8_batches_are_refused_and_write_nothing(wire):
    src_ids, dst_ids = SENDS["three-runs"]
    src = random_pool(POOL, seed=3)
    _, msg, frames = send_int8(wire, src, POOL, 0, src_ids, dst_ids)
    keys, values, scales = frames
    pool = random_pool(POOL, seed=4)
    before = pool.clone()
    receiver = KVReceiver(pool)

    def forged(frames, **changes):  # a header signed for these frames
        num_bytes = sum(len(f) for f in frames)
        return msgspec.structs.replace(
            msg, checksum=xxh3(frames), num_bytes=num_bytes, **changes
        ), frames

    damaged = {
        "scales-missing": forged([keys, values]),
        "scales-short": forged([keys, values, scales[:-4]]),
        "int8-frames-read-as-full-precision": forged(frames, wire_dtype=None),
        "unknown-wire-dtype": forged(frames, wire_dtype="fp8"),
        "int8-frames-without-scales-as-full": forged([keys, values], wire_dtype=None),
        "keys-flipped": (msg, [flipped(keys, 3), values, scales]),
        "scale-flipped": (msg, [keys, values, flipped(scales, 5)]),
    }
    for name, (bad_msg, bad_frames) in damaged.items():
        assert receiver.write_layer(bad_msg, bad_frames) is False, name
        assert same_bits(pool, before), name
    assert receiver.write_layer(msg, frames)
    assert same_bits(pool, expected_pool(before, src, 0, src_ids, dst_ids))


def test_full_precision_stays_the_default(wire):
    src = random_pool(POOL, seed=3)
    dest = destination("tcp", [0, 1], kv_addr=wire.addr)
    assert dest.wire_dtype is None
    TcpSender(src, POOL, wire.peers).send_layer(dest, 0, [2, 3], [0, 1])
    msg, frames = wire.receive()
    assert msg.wire_dtype is None and len(frames) == 2


def test_messages_round_trip_with_wire_dtype():
    dest = destination("tcp", [1, 2], wire_dtype="int8")
    layer = m.KVLayer("t", 0, [1, 2], 7, 100, [2], "int8")
    prefill = m.PrefillRequest("r", [1, 2, 3], m.SamplingParams(), dest, 5.0)
    assert m.decode(m.encode(prefill)) == prefill
    assert m.decode(m.encode(layer)) == layer
    # the default is left out of the encoding: older peers see the same bytes as before
    assert m.encode(m.KVLayer("t", 0, [1], 7, 100, [1])) == m.encode(
        m.KVLayer("t", 0, [1], 7, 100, [1], None)
    )


def test_routing_option_is_validated_and_reaches_tcp_destinations_only():
    with pytest.raises(ConfigError, match="kv_wire_dtype"):
        RoutingConfig(kv_wire_dtype="int4")
    assert ServeConfig(kv_wire_dtype="int8").routing().kv_wire_dtype == "int8"
    assert RoutingConfig().kv_wire_dtype == "auto"
    routing = RoutingConfig(kv_wire_dtype="int8")
    dispatcher = Dispatcher(None, None, None, lambda: routing, lambda: None)
    assert [dispatcher._wire_dtype(b) for b in ("tcp", "shm", "nixl")] == ["int8", None, None]
    routing = RoutingConfig()
    assert dispatcher._wire_dtype("tcp") is None
