"""The shm backend: a prefill worker writes exactly the requested blocks into a decode
worker's pool mapped from its file, and maps nothing but pdserve pools of the right size.
Pools live in a temporary folder standing in for /dev/shm (`shm_dir`)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from pdserve.transfer import shm
from pdserve.transfer.base import TransferError
from pdserve.transfer.shm import ShmSender
from tests.transfer.helpers import (
    LAYOUT,
    copied,
    destination,
    layer_block_bytes,
    random_pool,
    same_bits,
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shm_send_layer_writes_exactly_the_requested_blocks(shm_dir, dtype):
    layout = msgspec.structs.replace(LAYOUT, dtype=dtype)
    path = shm.shm_pool_path("decode/0")
    assert path.parent == shm_dir and path.name.startswith("pdserve-kv-decode_0-")
    decode_pool = shm.create_shared_pool(path, layout)
    assert decode_pool.shape == layout.shape and not decode_pool.any()
    decode_pool.copy_(random_pool(layout, seed=1))  # so "unchanged" is not just zeros
    before = decode_pool.clone()
    src = random_pool(layout, seed=2)
    sender = ShmSender(src, layout, None)  # writes in place: no sockets
    src_ids, dst_ids = [0, 1, 5, 6], [7, 2, 3, 4]
    dest = destination("shm", dst_ids, shm_path=str(path))
    num_bytes = sender.send_layer(dest, 1, src_ids, dst_ids)
    assert num_bytes == 4 * layer_block_bytes(layout)
    sender.flush()  # a no-op: the bytes are in place when send_layer returns
    expected = copied(before, src, 1, src_ids, dst_ids)
    assert same_bits(decode_pool, expected)
    on_disk = np.fromfile(path, dtype=np.uint8)  # what any other process maps
    assert np.array_equal(on_disk, expected.view(torch.uint8).flatten().numpy())


def test_shm_pools_are_shared_between_mappings(shm_dir):
    path = shm_dir / "pdserve-kv-w-1"
    a = shm.create_shared_pool(path, LAYOUT)
    b = shm.open_shared_pool(str(path), LAYOUT)
    a[1, 0, 3].fill_(2.5)
    assert torch.equal(b[1, 0, 3], torch.full_like(b[1, 0, 3], 2.5))
    assert float(b.sum()) == 2.5 * 4 * 2 * 8


def test_open_shared_pool_maps_only_pdserve_pools(shm_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "pdserve-kv-x"
    unprefixed = shm_dir / "kv-x"
    nested = shm_dir / "sub" / "pdserve-kv-x"
    nested.parent.mkdir()
    for path in (elsewhere, unprefixed, nested):
        shm.create_shared_pool(path, LAYOUT)  # valid pools, in places not to be mapped
    traversal = f"{shm_dir}/../{elsewhere.parent.name}/pdserve-kv-x"
    for path in (str(elsewhere), str(unprefixed), str(nested), traversal, "/etc/passwd"):
        with pytest.raises(TransferError, match="not a pdserve KV pool"):
            shm.open_shared_pool(path, LAYOUT)
    link = shm_dir / "pdserve-kv-link"
    link.symlink_to(elsewhere)  # the right name, the right size, somewhere else
    with pytest.raises(TransferError, match="not a regular file"):
        shm.open_shared_pool(str(link), LAYOUT)
    with pytest.raises(TransferError, match="not a regular file"):
        ShmSender(random_pool(LAYOUT, 0), LAYOUT, None).send_layer(
            destination("shm", [0], shm_path=str(link)), 0, [0], [0]
        )
    assert not np.fromfile(elsewhere, dtype=np.uint8).any()


def test_open_shared_pool_checks_the_size(shm_dir):
    path = shm_dir / "pdserve-kv-w-1"
    shm.create_shared_pool(path, LAYOUT)
    size = LAYOUT.num_layers * LAYOUT.num_blocks * layer_block_bytes(LAYOUT)
    more_blocks = msgspec.structs.replace(LAYOUT, num_blocks=9)
    with pytest.raises(TransferError, match=f"has {size} bytes, expected {size * 9 // 8}"):
        shm.open_shared_pool(str(path), more_blocks)
    with pytest.raises(TransferError, match=f"has {size} bytes, expected {size // 2}"):
        shm.open_shared_pool(str(path), msgspec.structs.replace(LAYOUT, dtype="bfloat16"))
    with pytest.raises(TransferError, match="does not exist"):
        shm.open_shared_pool(str(shm_dir / "pdserve-kv-gone"), LAYOUT)


def test_shm_sender_refuses_bad_destinations(shm_dir):
    path = shm_dir / "pdserve-kv-w-1"
    pool = shm.create_shared_pool(path, LAYOUT)
    (shm_dir / "pdserve-kv-torn").write_bytes(b"\0" * 10)
    sender = ShmSender(random_pool(LAYOUT, 0), LAYOUT, None)
    cases = [
        (None, [1], "offers no shared KV pool"),
        (str(shm_dir / "pdserve-kv-torn"), [1], "not a whole pool"),
        (str(shm_dir / "pdserve-kv-gone"), [1], "missing"),
        (str(path), [8], "out of range"),
    ]
    for shm_path, dst_ids, error in cases:
        with pytest.raises(TransferError, match=error):
            sender.send_layer(destination("shm", dst_ids, shm_path=shm_path), 0, [0], dst_ids)
    assert not pool.any()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_pools_are_resident_once_mapped(shm_dir):
    # 32 MiB: far above what else this test allocates, so the RSS step is the pool's.
    layout = msgspec.structs.replace(LAYOUT, num_blocks=16384)
    kib = layout.num_layers * 2 * 16384 * 4 * 2 * 8 * 4 // 1024
    path = shm.shm_pool_path("decode-0")
    before = _rss_kib()
    pool = shm.create_shared_pool(path, layout)
    created = _rss_kib()
    assert created - before >= 0.9 * kib  # every page written at creation
    assert not pool.any()
    mapped = shm.open_shared_pool(str(path), layout)  # a second mapping, as a prefill worker
    assert _rss_kib() - created >= 0.9 * kib  # its pages mapped now, not at first use
    assert not mapped.any()
