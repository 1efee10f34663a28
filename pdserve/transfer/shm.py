"""The `shm` backend: same host, the prefill worker writes straight into the decode
worker's KV pool.

A decode worker that accepts `shm` allocates its whole pool as a file in `/dev/shm`
mapped with `MAP_SHARED` (`torch.from_file(shared=True)`); a prefill worker maps the same
file and copies each finished layer's blocks into the reserved blocks: one copy, no
socket, no serialisation. The file is named after the worker and its pid and unlinked
when the worker exits (the launcher also removes files of workers that died).

Both sides touch every page of a pool when they map it (`touch_pages`): the decode worker
writes the zeros, so the file's memory is allocated at start-up (a full /dev/shm fails
there, not as a SIGBUS mid-request) and the first use of a block is not a page fault that
costs more than the copy (first touch ~1.35 GB/s against ~20 GB/s warm on these hosts,
MACHINE_NOTES); the prefill worker reads one byte a page, which maps the existing pages.
So a worker's RSS (RssShmem) holds its pools from the start instead of climbing towards
them while serving, as the soak benchmark first saw.

Only paths named `pdserve-kv-*` inside the shared-memory folder are ever opened, so a
forged registration cannot make a prefill worker write anywhere else.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import torch

from pdserve.ipc.messages import KVDestination, KVLayout
from pdserve.transfer import SHM_DIR, SHM_PREFIX
from pdserve.transfer.base import KVSender, TransferError, block_runs, register_sender

MAX_COPY_RUNS = 8  # measured: index_select + index_copy_ is 1.6x faster on scattered ids

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shm_pool_path(worker_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in worker_id)
    return SHM_DIR / f"{SHM_PREFIX}{safe}-{os.getpid()}"


def _numel(layout: KVLayout) -> int:
    total = 1
    for dim in layout.shape:
        total *= dim
    return total


def remove_stale_pools() -> list[Path]:
    """Delete pool files whose worker process no longer exists (a worker killed with
    SIGKILL cannot clean up after itself); returns them."""
    removed = []
    for path in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _is_running(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def touch_pages(pool: torch.Tensor, write: bool) -> None:
    """Fault in every page of a contiguous mapped pool now: write zeros (a new pool: this
    allocates the file's memory), or read one byte a page (a pool another process owns)."""
    if write:
        pool.zero_()
    else:
        pool.reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()


def create_shared_pool(path: Path, layout: KVLayout) -> torch.Tensor:
    """A zero-filled pool backed by a new shared file, every page touched (decode side)."""
    remove_stale_pools()
    if path.exists():
        path.unlink()
    pool = torch.from_file(
        str(path), shared=True, size=_numel(layout), dtype=TORCH_DTYPES[layout.dtype]
    )
    touch_pages(pool, write=True)
    return pool.view(layout.shape)


def open_shared_pool(path: str, layout: KVLayout) -> torch.Tensor:
    """Map a decode worker's pool (prefill side); checks name and size first."""
    p = Path(path)
    if p.parent != SHM_DIR or not p.name.startswith(SHM_PREFIX):
        raise TransferError(f"refusing to map {path!r}: not a pdserve KV pool")
    dtype = TORCH_DTYPES[layout.dtype]
    expected = _numel(layout) * dtype.itemsize
    try:
        info = p.lstat()  # NOTE: not stat(): a symlink by a pool's name must not be followed
    except FileNotFoundError as e:
        raise TransferError(f"KV pool {path} does not exist (worker gone?)") from e
    if not stat.S_ISREG(info.st_mode):
        raise TransferError(f"refusing to map {path!r}: not a regular file")
    size = info.st_size
    if size != expected:
        raise TransferError(f"KV pool {path} has {size} bytes, expected {expected}")
    pool = torch.from_file(str(p), shared=True, size=_numel(layout), dtype=dtype)
    touch_pages(pool, write=False)
    return pool.view(layout.shape)


@register_sender("shm")
class ShmSender(KVSender):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pools: dict[str, torch.Tensor] = {}

    def _pool(self, dest: KVDestination) -> torch.Tensor:
        if dest.shm_path is None:
            raise TransferError(f"worker {dest.worker_id} offers no shared KV pool")
        pool = self._pools.get(dest.shm_path)
        if pool is None:
            # A new pool usually means a decode worker restarted: unmap the vanished ones.
            for path in [p for p in self._pools if not Path(p).exists()]:
                self.forget(path)
            # The remote block count is unknown here; map the file by its size.
            size = Path(dest.shm_path).stat().st_size if Path(dest.shm_path).exists() else 0
            per_block = self._bytes_per_block()
            if size == 0 or size % per_block:
                raise TransferError(f"KV pool {dest.shm_path} is missing or not a whole pool")
            layout = KVLayout(
                self.layout.num_layers,
                size // per_block,
                self.layout.block_size,
                self.layout.num_kv_heads,
                self.layout.head_dim,
                self.layout.dtype,
            )
            pool = open_shared_pool(dest.shm_path, layout)
            self._pools[dest.shm_path] = pool
        return pool

    def _bytes_per_block(self) -> int:
        c = self.layout
        itemsize = TORCH_DTYPES[c.dtype].itemsize
        return c.num_layers * 2 * c.block_size * c.num_kv_heads * c.head_dim * itemsize

    def send_layer(
        self, dest: KVDestination, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> int:
        remote = self._pool(dest)[layer]  # [2, N, B, H, D]
        local = self.kv_cache[layer]
        if max(dst_block_ids, default=0) >= remote.shape[1]:
            raise TransferError(f"destination block out of range for {dest.shm_path}")
        runs = block_runs(src_block_ids, dst_block_ids)
        if len(runs) > MAX_COPY_RUNS:  # scattered blocks: two indexed copies beat many small ones
            dst = torch.tensor(dst_block_ids)
            remote.index_copy_(1, dst, local.index_select(1, torch.tensor(src_block_ids)))
        else:
            for src, dst, n in runs:
                remote[:, dst : dst + n].copy_(local[:, src : src + n])
        return local[:, : len(src_block_ids)].numel() * local.element_size()

    def forget(self, shm_path: str) -> None:
        self._pools.pop(shm_path, None)

    def close(self) -> None:
        self._pools.clear()
