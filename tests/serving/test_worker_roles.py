"""Per-role engine settings on real worker processes: a prefill and a decode worker started
by `WorkerProcesses` from one `ServeConfig` run with their own role's KV pool size, and a
disaggregated request crosses the two."""

from __future__ import annotations

import asyncio

from pdserve.ipc.security import TemporaryKey
from pdserve.router.cluster import ClusterClient
from pdserve.router.policy import RoutingConfig
from pdserve.sampling_params import SamplingParams
from pdserve.serve import ServeConfig, WorkerProcesses


def test_prefill_and_decode_workers_start_with_their_role_settings(builtin_model_dir):
    config = ServeConfig.from_dict(
        {
            "threads_per_worker": 1,
            "log_level": "WARNING",
            "engine": {"num_kv_blocks": 128, "max_model_len": 512},
            "engine_prefill": {"num_kv_blocks": 96, "max_num_batched_tokens": 32},
            "engine_decode": {"num_kv_blocks": 160, "max_num_seqs": 8},
        }
    )
    asyncio.run(_run(config, builtin_model_dir))


async def _run(config: ServeConfig, model_dir) -> None:
    key = TemporaryKey()
    client = ClusterClient(
        model_dir,
        "tcp://127.0.0.1:0",
        routing=RoutingConfig(mode="disaggregated"),
        min_workers=2,
        cluster_key=key.key,
    )
    await client.start()
    workers = WorkerProcesses(config, model_dir, client.router_addr, key.path)
    try:
        workers.start(config.worker_counts())
        assert (await client.wait_until_ready(120)).is_ready
        pools = {w.role: w.info.kv_layout.num_blocks for w in client.pool.workers.values()}
        assert pools == {"prefill": 96, "decode": 160}
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        updates = [u async for u in client.generate("r", None, list(range(1, 60)), params)]
        assert len(updates[-1].output.outputs[0].token_ids) == 4
    finally:
        await client.stop(shutdown_workers=True)
        workers.stop()
        key.remove()
