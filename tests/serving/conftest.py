"""A live cluster for serving tests: the router's `ClusterClient` on an event loop in a
background thread, and real worker processes (one prefill, one decode, one mixed) on the
built-in model. The routing mode and KV backend are router-side settings, so one set of
workers serves every mode: tests switch `cluster.client.routing`.

Workers use a small token budget (`max_num_batched_tokens=64`) so prompts longer than
64 tokens are prefilled in several chunks, and one thread each.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.config import EngineConfig
from pdserve.ipc.security import TemporaryKey
from pdserve.router.cluster import ClusterClient
from pdserve.router.policy import RoutingConfig
from pdserve.sampling_params import SamplingParams
from pdserve.serve import ServeConfig, WorkerProcesses

# Batch-invariant: tests compare the cluster's greedy and seeded tokens with the offline
# engine's, run in other batches; only this mode makes that exact on every CPU.
ENGINE = EngineConfig(
    max_num_batched_tokens=64, num_kv_blocks=512, max_model_len=2048, batch_invariant=True
)
NUM_BLOCKS = 512


class Cluster:
    def __init__(self, model_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.key = TemporaryKey()  # CURVE on every socket, as `pdserve serve` runs it
        self.client = ClusterClient(
            model_dir, "tcp://127.0.0.1:0", min_workers=3, cluster_key=self.key.key
        )
        self.run(self.client.start())
        config = ServeConfig(
            prefill_workers=1,
            decode_workers=1,
            mixed_workers=1,
            threads_per_worker=1,
            engine=ENGINE,
            log_level="WARNING",
        )
        self.workers = WorkerProcesses(config, model_dir, self.client.router_addr, self.key.path)
        self.workers.start(config.worker_counts())
        readiness = self.run(self.client.wait_until_ready(120))
        assert readiness.is_ready, readiness

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def set_routing(self, **changes) -> None:
        self.client.routing = replace(RoutingConfig(), **changes)

    def generate(self, token_ids: list[int], params: SamplingParams, request_id: str):
        """Run one request to the end; returns the final RequestOutput and the updates."""

        async def collect():
            updates = []
            async for update in self.client.generate(request_id, None, token_ids, params):
                updates.append(update)
            return updates

        updates = self.run(collect())
        return updates[-1].output, updates

    def generate_many(self, prompts: list[list[int]], params: SamplingParams, prefix: str):
        async def one(i, ids):
            last = None
            async for update in self.client.generate(f"{prefix}-{i}", None, ids, params):
                last = update.output
            return last

        async def all_():
            return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))

        return self.run(all_())

    def wait_idle(self, timeout: float = 10.0) -> dict[str, tuple[int, int]]:
        """Wait until every worker reports all blocks free; return {worker: (free, total)}."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            # Only stats sent after this call began count: older ones may predate an abort.
            stats = {
                w.worker_id: (w.stats.num_free_blocks, w.stats.num_blocks)
                for w in self.client.pool.workers.values()
                if w.stats is not None and w.stats_time > start
            }
            is_idle = all(free == total for free, total in stats.values())
            if (is_idle and len(stats) == 3) or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def close(self) -> None:
        self.run(self.client.stop(shutdown_workers=True))
        self.workers.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.key.remove()


@pytest.fixture(scope="session")
def cluster(builtin_model_dir) -> Iterator[Cluster]:
    c = Cluster(builtin_model_dir)
    try:
        yield c
    finally:
        c.close()
