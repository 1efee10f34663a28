"""The `nixl` backend: one-sided RDMA-style writes with NVIDIA's NIXL (optional).

Both workers register their whole KV pool with a NIXL agent (UCX backend) at start-up; the
decode worker publishes its agent metadata and the pool's address in `Register`
(`NixlPeer`), the router hands them to the prefill worker inside `KVDestination`, and the
prefill worker writes each layer's runs of blocks straight into the reserved blocks:
`initialize_xfer("WRITE", local descs, remote descs)` per layer, completion checked in
`flush()` at the end of the step. No checksum: the transport delivers or reports an error.
The decode worker's CPU does nothing per batch, as with `shm`, but across hosts.

Installed with `pip install pdserve[nixl]` (the `nixl` wheel); without it, asking for this
backend is a `TransferError` that says so. NOTE: each NIXL agent runs a progress thread that
polls continuously (a whole core on a CPU host, measured); that is why this backend is
opt-in and never chosen unless workers are started with it. Works on CPU memory (`DRAM`) and on CUDA pools
(`VRAM`), so the same code serves GPU deployments.
"""

from __future__ import annotations

import time

from pdserve.ipc.messages import KVDestination, NixlPeer
from pdserve.transfer.base import KVSender, TransferError, block_runs, register_sender

FLUSH_TIMEOUT_S = 10.0


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except ImportError:
        return False
    return True


@register_sender("nixl")
class NixlSender(KVSender):
    def __init__(self, *args, agent_name: str = "pdserve", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError as e:
            raise TransferError("the nixl backend needs the nixl package: pip install nixl") from e
        self.agent = nixl_agent(agent_name, nixl_agent_config(backends=["UCX"]))
        self._registration = self.agent.register_memory(self.kv_cache)
        self._mem_type = "VRAM" if self.kv_cache.is_cuda else "DRAM"
        self._device_id = self.kv_cache.device.index or 0
        self._remote_agents: dict[bytes, str] = {}  # metadata -> agent name
        self._handles: list = []

    def peer_info(self) -> NixlPeer:
        """What a prefill worker needs to write into this worker's pool."""
        return NixlPeer(
            agent_metadata=self.agent.get_agent_metadata(),
            pool_addr=self.kv_cache.data_ptr(),
            num_blocks=self.kv_cache.shape[2],
        )

    def _remote_agent(self, peer: NixlPeer) -> str:
        name = self._remote_agents.get(peer.agent_metadata)
        if name is None:
            name = self.agent.add_remote_agent(peer.agent_metadata)
            if isinstance(name, bytes):
                name = name.decode()
            self._remote_agents[peer.agent_metadata] = name
        return name

    def send_layer(
        self, dest: KVDestination, layer: int, src_block_ids: list[int], dst_block_ids: list[int]
    ) -> int:
        peer = dest.nixl
        if peer is None:
            raise TransferError(f"worker {dest.worker_id} offers no NIXL pool", [dest.kv_addr])
        if max(dst_block_ids, default=0) >= peer.num_blocks:
            raise TransferError(f"destination block out of range for {dest.worker_id}")
        local = self.kv_cache[layer]  # [2, N, B, H, D]
        block_bytes = local[0, 0].numel() * local.element_size()
        layer_stride = 2 * peer.num_blocks * block_bytes  # bytes per layer in the remote pool
        local_descs, remote_descs = [], []
        for src, dst, n in block_runs(src_block_ids, dst_block_ids):
            for kv in (0, 1):
                size = n * block_bytes
                local_descs.append((local[kv, src].data_ptr(), size, self._device_id))
                remote = (
                    peer.pool_addr
                    + layer * layer_stride
                    + (kv * peer.num_blocks + dst) * block_bytes
                )
                remote_descs.append((remote, size, self._device_id))
        if not local_descs:
            return 0
        agent = self.agent
        handle = agent.initialize_xfer(
            "WRITE",
            agent.get_xfer_descs(local_descs, self._mem_type),
            agent.get_xfer_descs(remote_descs, self._mem_type),
            self._remote_agent(peer),
        )
        if agent.transfer(handle) == "ERR":
            agent.release_xfer_handle(handle)
            raise TransferError(f"NIXL write to {dest.worker_id} failed", [dest.kv_addr])
        self._handles.append((handle, dest.kv_addr))
        return sum(size for _, size, _ in local_descs)

    def flush(self) -> None:
        """Wait for every write of this step to complete in the remote pool."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        failed = []
        for handle, addr in self._handles:
            while (state := self.agent.check_xfer_state(handle)) == "PROC":
                if time.monotonic() > deadline:
                    state = "ERR"
                    break
            if state != "DONE":
                failed.append(addr)
            self.agent.release_xfer_handle(handle)
        self._handles.clear()
        if failed:
            raise TransferError(f"NIXL writes to {sorted(set(failed))} did not complete", failed)

    def close(self) -> None:
        self.flush()
        self.agent.deregister_memory(self._registration)
