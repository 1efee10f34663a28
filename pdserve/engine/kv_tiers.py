"""Joins the tiered KV store (`kvstore/`) to one engine: what to save, what to load, and when.
The engine's half of the tiers, so `kvstore/` never imports the engine.

Two halves, called at fixed points of `EngineCore.step`:
- scheduler side, at admission (`Scheduler._schedule_waiting`): `lookup` extends the
  device prefix hit with blocks found in the tiers; after the scheduler allocates fresh
  device blocks for them, `schedule_load` pairs each with its stored block and registers
  them in the device prefix cache at once (a later request in the same step shares them).
- engine side, after `schedule()` and before the model runs (`before_execute`): first the
  cached blocks the block manager handed out for new data (`drain_evicted`) are copied to
  the host — their KV is intact until the model writes — then, with a slow tier (disk or
  Redis), the blocks committed since the last step are copied and queued for it (write-
  through: a crashed worker loses at most the writer's queue), then the scheduled loads
  are copied into their device blocks. Saving comes first because a load may target a
  block that was just evicted.
- admission (`on_admit`, from the scheduler when a request is first admitted or a
  reservation made): the request's prefix chain is counted by the store's admission
  policy (kvstore/admission.py). Blocks it serves from the device pool whose chain just
  became hot enough for the slow tiers are queued with the write-through, since a block
  that stays cached on the device is never committed again.

The device stays a parameter: copies are `index_select`/`index_copy_` on the pool's own
device and one transfer to or from the host, never a CPU assumption.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from pdserve.kv.block_hash import BlockHash
from pdserve.kvstore.admission import make_admission
from pdserve.kvstore.block import BlockLayout, StoredBlock
from pdserve.kvstore.disk import DiskTier
from pdserve.kvstore.fingerprint import model_fingerprint
from pdserve.kvstore.host import HostTier
from pdserve.kvstore.redis_tier import RedisTier
from pdserve.kvstore.store import TieredKVStore
from pdserve.kvstore.tier import EventSink, KVTier

if TYPE_CHECKING:
    from pdserve.config import EngineConfig, ModelConfig
    from pdserve.engine.block_manager import BlockManager
    from pdserve.engine.request import Request

logger = logging.getLogger(__name__)

GIB = 2**30


class _HotBlock(NamedTuple):
    """A device-cached block to write through (the fields of the block manager's
    `EvictedBlock`, which kvstore/ does not import: it stays below engine/)."""

    block_hash: BlockHash
    block_id: int
    token_ids: tuple[int, ...]


class KVTierConnector:
    def __init__(
        self, store: TieredKVStore, block_manager: BlockManager, kv_cache: torch.Tensor
    ) -> None:
        self.store = store
        self.block_manager = block_manager
        self.kv_cache = kv_cache  # [L, 2, num_blocks, B, H, D]
        # A block's bytes as the tiers hold it (KV, then its token ids): admission's size.
        size = block_manager.block_size
        self._block_nbytes = kv_cache[:, :, 0].numel() * kv_cache.element_size() + 8 * size
        # One admission's lookup, kept while the request waits for room: (request id,
        # device hit in blocks, blocks found). Only the head of the queue is looked up.
        self._found: tuple[str, int, list[StoredBlock]] | None = None
        self._loads: list[tuple[int, StoredBlock]] = []  # (device block id, block)
        # Device-cached blocks that just became hot: written through like new ones.
        self._hot: list[_HotBlock] = []
        if store.write_through_index is not None:
            block_manager.committed = []  # record new blocks for the write-through

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        model_config: ModelConfig,
        model_dir: Path,
        block_manager: BlockManager,
        kv_cache: torch.Tensor,
    ) -> KVTierConnector:
        layout = BlockLayout(
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            block_size=config.block_size,
            dtype=kv_cache.dtype,
            model_id=model_fingerprint(model_dir),
        )
        events = EventSink()
        tiers: list[KVTier] = []
        if config.kv_host_cache_gib > 0:
            tiers.append(HostTier(int(config.kv_host_cache_gib * GIB), events))
        if config.kv_disk_cache_dir:
            cap = int(config.kv_disk_cache_gib * GIB)
            tiers.append(DiskTier(config.kv_disk_cache_dir, cap, layout, events))
        if config.kv_redis_url:
            secret = config.kv_tier_secret
            tiers.append(RedisTier(config.kv_redis_url, layout, events, secret=secret))
        admission = make_admission(
            config.kv_tier_admission,
            _slow_tier_blocks(tiers, layout),
            config.kv_tier_admission_threshold,
        )
        use_int8 = config.kv_tier_dtype == "int8"
        store = TieredKVStore(tiers, events, use_int8=use_int8, admission=admission)
        logger.info(
            "KV tiers: %s (admission: %s)", ", ".join(t.name for t in tiers), admission.name
        )
        return cls(store, block_manager, kv_cache)

    # ---- scheduler side ------------------------------------------------------------------

    def lookup(self, request: Request, num_cached_blocks: int) -> int:
        """Tokens beyond the device hit of `num_cached_blocks` blocks found in the tiers
        (whole blocks, always leaving one prompt token to compute)."""
        found = self._found
        if found is None or found[:2] != (request.request_id, num_cached_blocks):
            found = (
                request.request_id,
                num_cached_blocks,
                self._lookup(request, num_cached_blocks),
            )
            self._found = found
        return len(found[2]) * self.block_manager.block_size

    def _lookup(self, request: Request, start: int) -> list[StoredBlock]:
        size = self.block_manager.block_size
        max_blocks = (request.num_tokens - 1) // size
        hashes = request.update_block_hashes(size)[start:max_blocks]
        if not hashes:
            return []

        def token_ids_of(i: int) -> tuple[int, ...]:
            first = (start + i) * size
            return tuple(request.token_ids(first, first + size))

        return self.store.lookup(hashes, token_ids_of)

    def on_admit(self, request: Request, cached_block_ids: list[int]) -> None:
        """Count one sighting of `request`'s prefix chain (its first admission, or a
        reservation); queue the device-cached blocks that just became hot for writing."""
        size = self.block_manager.block_size
        hashes = request.update_block_hashes(size)[: request.num_prompt_tokens // size]
        hot = self.store.record(hashes)
        if self.store.write_through_index is None:
            return
        blocks = self.block_manager.blocks
        for i in hot:
            if i < len(cached_block_ids):
                block = blocks[cached_block_ids[i]]
                self._hot.append(_HotBlock(hashes[i], block.block_id, block.token_ids))

    def schedule_load(self, request: Request, num_cached_blocks: int) -> None:
        """After `allocate` (and `num_computed_tokens` set past the loaded blocks): pair
        the fresh blocks with what `lookup` found, and register them as cached."""
        found = self._found
        self._found = None
        if found is None or found[:2] != (request.request_id, num_cached_blocks):
            raise RuntimeError(f"schedule_load without lookup for {request.request_id}")
        block_ids = request.block_ids[num_cached_blocks : num_cached_blocks + len(found[2])]
        self._loads.extend(zip(block_ids, found[2], strict=True))
        self.block_manager.commit_full_blocks(request)

    # ---- engine side ---------------------------------------------------------------------

    def before_execute(self) -> None:
        """Save evicted device blocks, then load the scheduled ones (before the model runs)."""
        self.save_evicted()
        self._load_scheduled()

    def save_evicted(self) -> None:
        """Copy the cached device blocks just handed out for new data to the store, and
        the newly committed ones to the write-through tier: both before anything (a step,
        a prefill worker writing a reservation) can overwrite them."""
        self._write_through()
        evicted = self.block_manager.drain_evicted()
        if not evicted:
            return
        kvs = self._copy_to_host([e.block_id for e in evicted])
        self.store.put(
            StoredBlock(e.block_hash, e.token_ids, kv) for e, kv in zip(evicted, kvs, strict=True)
        )

    def _write_through(self) -> None:
        committed = self.block_manager.committed
        if not committed and not self._hot:
            return
        committed = [*committed, *self._hot]
        self.block_manager.committed = []
        self._hot = []
        index = self.store.write_through_index
        tier = self.store.tiers[index]
        fresh = [c for c in committed if not tier.contains(c.block_hash)]
        # Ask before copying: a refused block costs no copy off the device.
        nbytes = self._block_nbytes
        fresh = [c for c in fresh if self.store.admits_through(c.block_hash, nbytes)]
        if not fresh:
            return  # e.g. blocks just loaded from that tier, or none admitted
        kvs = self._copy_to_host([c.block_id for c in fresh])
        blocks = (
            StoredBlock(c.block_hash, c.token_ids, kv) for c, kv in zip(fresh, kvs, strict=True)
        )
        self.store.write_through(blocks, is_admitted=True)

    def _load_scheduled(self) -> None:
        if not self._loads:
            return
        block_ids = [block_id for block_id, _ in self._loads]
        kvs = [block.to_kv(self.kv_cache.dtype) for _, block in self._loads]
        self._loads = []
        device = self.kv_cache.device
        index = torch.tensor(block_ids, dtype=torch.int64, device=device)
        values = torch.stack(kvs, dim=2).to(device)  # [L, 2, n, B, H, D]
        self.kv_cache.index_copy_(2, index, values)

    def _copy_to_host(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Each block's `[L, 2, B, H, D]` as its own contiguous host tensor, so the host
        tier frees memory block by block."""
        kv_cache = self.kv_cache
        if kv_cache.device.type == "cpu":  # one copy per block
            return [
                kv_cache[:, :, b].clone(memory_format=torch.contiguous_format) for b in block_ids
            ]
        # An accelerator: gather on the device, then one transfer for the whole batch.
        index = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
        gathered = kv_cache.index_select(2, index).movedim(2, 0).contiguous().to("cpu")
        return [block.clone() for block in gathered]  # [n, L, 2, B, H, D] → n blocks

    # ---- lifecycle and observability -----------------------------------------------------

    def close(self, persist: bool = True) -> None:
        """Stop the writer; with `persist`, first write every cached device block and RAM
        block down to the lowest tiers and wait, so a restart finds them."""
        if persist:
            self._save_device_cache()
            self.store.persist()
        self.store.close()

    def _save_device_cache(self) -> None:
        cached = [b for b in self.block_manager.blocks if b.block_hash is not None]
        fresh = [b for b in cached if not self.store.contains(b.block_hash)]
        if not fresh:
            return
        kvs = self._copy_to_host([b.block_id for b in fresh])
        self.store.put(
            (StoredBlock(b.block_hash, b.token_ids, kv) for b, kv in zip(fresh, kvs, strict=True)),
            wait=True,
        )

    def drain_events(self) -> list:
        """The tiers' KV events since the last call (a worker's `KVEventSource.drain`)."""
        return self.store.drain_events()

    def snapshot_events(self) -> list:
        """What the tiers hold now (a worker's `KVEventSource.snapshot`)."""
        return self.store.snapshot_events()


def _slow_tier_blocks(tiers: list[KVTier], layout: BlockLayout) -> int | None:
    """Blocks the capped slow tiers hold together (sizes the admission sketch); None when
    only uncapped ones (Redis) are configured."""
    capped = [t.capacity_bytes for t in tiers if not t.is_fast and t.capacity_bytes]
    if not capped:
        return None
    block_bytes = layout.dtype.itemsize * math.prod(layout.kv_shape)
    return max(1, sum(capped) // block_bytes)
