"""The nixl backend, where the `nixl` package is installed (pip install -e ".[nixl]").

Two NIXL agents in one process stand for a prefill and a decode worker: the decode side's
pool is registered and described by `peer_info()`, the prefill side writes runs of blocks
into it layer by layer, and `flush()` returns once they landed.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.ipc import messages as m
from pdserve.transfer.backends import make_sender
from pdserve.transfer.base import PeerSockets, TransferError

pytest.importorskip("nixl._api", reason="the nixl package is not installed (optional extra)")

LAYOUT = m.KVLayout(
    num_layers=3, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32"
)


@pytest.fixture
def pair():
    torch.manual_seed(0)
    src_pool = torch.randn(LAYOUT.shape)
    dst_pool = torch.zeros(LAYOUT.shape)
    peers = PeerSockets(ctx=None)
    prefill = make_sender("nixl", src_pool, LAYOUT, peers, agent_name="test-prefill")
    decode = make_sender("nixl", dst_pool, LAYOUT, peers, agent_name="test-decode")
    yield prefill, decode, src_pool, dst_pool
    prefill.close()
    decode.close()


def test_writes_exactly_the_requested_blocks_of_each_layer(pair):
    prefill, decode, src_pool, dst_pool = pair
    dest = m.KVDestination("d", "t-1", [7, 8, 2], "tcp://unused:1", "nixl", nixl=decode.peer_info())
    src, dst = [3, 4, 9], [7, 8, 2]  # two runs: 3-4 -> 7-8 and 9 -> 2
    before = dst_pool.clone()
    for layer in (0, 2):
        sent = prefill.send_layer(dest, layer, src, dst)
        assert sent == 2 * 3 * src_pool[0, 0, 0].numel() * 4
    prefill.flush()
    expected = before.clone()
    for layer in (0, 2):
        expected[layer][:, dst] = src_pool[layer][:, src]
    assert torch.equal(dst_pool, expected)  # layer 1 and every other block untouched


def test_rejects_a_destination_without_a_pool_or_out_of_range(pair):
    prefill, decode, _, _ = pair
    with pytest.raises(TransferError, match="offers no NIXL pool"):
        prefill.send_layer(m.KVDestination("d", "t", [0], "tcp://u:1", "nixl"), 0, [0], [0])
    dest = m.KVDestination("d", "t", [10], "tcp://u:1", "nixl", nixl=decode.peer_info())
    with pytest.raises(TransferError, match="out of range"):
        prefill.send_layer(dest, 0, [0], [10])
