"""What a worker process is made of: its `WorkerConfig`, and the engine core, KV pool and
KV senders built from it.

The pool is where the choices are: on a CPU every role puts it in shared memory (the `shm`
backend) so that any worker can become a decode worker that prefill workers write into
(`SetRole`); a disk tier gets a subfolder per worker id, so a restarted worker finds its
own blocks and no two processes clean up each other's files; a Redis tier's MAC key comes
from the cluster key. Built once, before the worker registers; worker/worker.py owns
the sockets and the loop that use them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.core import EngineCore
from pdserve.errors import PdserveError
from pdserve.ipc import messages as m
from pdserve.ipc.security import ClusterKey
from pdserve.transfer.backends import make_sender
from pdserve.transfer.base import PeerSockets
from pdserve.transfer.shm import TORCH_DTYPES, create_shared_pool, shm_pool_path

ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    role: str
    model_dir: Path
    router_addr: str  # the router's PULL socket, e.g. tcp://127.0.0.1:5557
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"  # where this worker's sockets bind
    advertise_host: str | None = None  # how others reach it when `host` is a wildcard
    backends: tuple[str, ...] = ("shm", "tcp")  # transfer backends offered / used
    kv_layerwise: bool = True
    # "encrypt": the kv socket speaks CURVE like the others; "mac": plain ZeroMQ with
    # every KV message authenticated by `security.KVMac` (integrity, not secrecy)
    kv_transport_security: str = "encrypt"
    # The cluster's CURVE key file (ipc/security.py); None only with --insecure-no-curve.
    cluster_key_file: Path | None = None
    # Stamped with the loop's last pass for outside supervisors (worker/liveness.py).
    health_file: Path | None = None


def make_core(
    config: WorkerConfig, cluster_key: ClusterKey | None
) -> tuple[EngineCore, Path | None]:
    """The engine core, and the shm file its KV pool lives in (None: a private pool)."""
    model_config = ModelConfig.from_pretrained(config.model_dir)
    shm_path = allocator = None
    # Every role's pool is shared (shm backend): a prefill worker may become a decode
    # worker at runtime (`SetRole`) and then needs prefill workers to write into it.
    is_cpu = config.engine.device == "cpu"
    if "shm" in config.backends and (is_cpu or config.role != "prefill"):
        if config.engine.device != "cpu":
            raise PdserveError(
                "the shm transfer backend needs the KV pool in host memory; "
                "use backend tcp (or nixl) on accelerators"
            )
        shm_path = shm_pool_path(config.worker_id)
        allocator = _shared_allocator(config, model_config, shm_path)
    engine = config.engine
    if engine.kv_disk_cache_dir:
        # Each worker owns a subfolder (its id): a restarted worker finds its own blocks
        # and no two processes clean up or cap each other's files.
        folder = str(Path(engine.kv_disk_cache_dir) / config.worker_id)
        engine = dataclasses.replace(engine, kv_disk_cache_dir=folder)
    if engine.kv_redis_url and cluster_key is not None:
        # Every worker of the cluster shares the Redis MAC key through the cluster key.
        engine = dataclasses.replace(engine, kv_tier_secret=cluster_key.kv_tier_secret())
    return EngineCore(config.model_dir, model_config, engine, allocator), shm_path


def _shared_allocator(config: WorkerConfig, model_config: ModelConfig, shm_path: Path):
    def allocate(num_blocks: int):
        layout = m.KVLayout(
            model_config.num_layers,
            num_blocks,
            config.engine.block_size,
            model_config.num_kv_heads,
            model_config.head_dim,
            config.engine.dtype,
        )
        return create_shared_pool(shm_path, layout)

    return allocate


def kv_layout(core: EngineCore) -> m.KVLayout:
    """The pool's layout as peers see it (`Register`)."""
    shape = core.runner.kv_cache.shape
    dtype = next(k for k, v in TORCH_DTYPES.items() if v == core.runner.kv_cache.dtype)
    return m.KVLayout(shape[0], shape[2], shape[3], shape[4], shape[5], dtype)


def make_senders(
    config: WorkerConfig, core: EngineCore, layout: m.KVLayout, peers: PeerSockets
) -> dict:
    """One KV sender per configured transfer backend, by name."""
    kv_cache = core.runner.kv_cache
    return {
        name: make_sender(name, kv_cache, layout, peers, **_options(config, name))
        for name in config.backends
    }


def _options(config: WorkerConfig, backend: str) -> dict:
    if backend == "nixl":  # agent names must be unique, also across restarts
        return {"agent_name": f"{config.worker_id}-{os.getpid()}"}
    return {}
