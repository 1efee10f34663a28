"""A rogue process on the network against the router's socket (issue 14, part 4): valid
msgpack, but no cluster key. With CURVE nothing it sends is ever decoded; the same
messages without CURVE would take the cluster over (the control case shows the test
can fail)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import msgspec
import zmq

from pdserve.ipc import messages as m
from pdserve.ipc.security import generate_key
from pdserve.router.cluster import ClusterClient
from pdserve.router.policy import RoutingConfig
from pdserve.sampling_params import SamplingParams
from tests.router.fake_workers import LAYOUT, FakeWorker

GREEDY3 = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def forged_messages() -> list[m.Message]:
    def register(worker_id: str, role: str, max_model_len: int) -> m.Register:
        addr = "tcp://127.0.0.1:1"
        return m.Register(
            worker_id,
            role,
            1,
            addr,
            addr,
            LAYOUT,
            max_model_len,
            ["tcp"],
            incarnation=uuid.uuid4().hex,
        )

    return [
        register("evil", "decode", 4096),  # a worker that would swallow requests
        register("w0", "mixed", 1),  # replaces the real w0 with an unusable one
        register("w0", "x", 4096),
        m.Draining("w0"),
        m.StepOutputs("w0", [m.CoreOutput("r", [666], finish_reason="stop")]),
    ]


async def forge(router_addr: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)  # a refused peer's queue never drains
    sock.setsockopt(zmq.SNDTIMEO, 500)  # nor blocks once the handshake failed
    sock.connect(router_addr)
    for message in forged_messages():
        with contextlib.suppress(zmq.Again):
            sock.send(m.encode(message))
    await asyncio.sleep(1.0)  # ample for a peer that gets through (the control case)
    ctx.destroy(0)


async def serve_one(client: ClusterClient, worker: FakeWorker) -> list[int]:
    async def consume():
        final = None
        async for update in client.generate("r", None, [5, 6, 7], GREEDY3):
            final = update.output
        return final

    task = asyncio.create_task(consume())
    add = await worker.next_command()
    assert isinstance(add, m.AddRequest) and add.request_id == "r"
    worker.emit("r", [10, 11])
    worker.emit("r", [12], finish_reason="length")
    return (await asyncio.wait_for(task, 5)).outputs[0].token_ids


async def run(model_dir, key) -> tuple[ClusterClient, dict, list[int]]:
    client = ClusterClient(
        model_dir,
        "tcp://127.0.0.1:0",
        routing=RoutingConfig(mode="aggregated"),
        cluster_key=key,
    )
    await client.start()
    worker = FakeWorker(client.ctx, client.router_addr, "w0", "mixed", key)
    try:
        worker.register()
        for _ in range(200):
            if "w0" in client.pool.workers:
                break
            await asyncio.sleep(0.01)
        before = {w: (h.incarnation, h.is_accepting) for w, h in client.pool.workers.items()}
        assert before == {"w0": (worker.incarnation, True)}
        await forge(client.router_addr)
        after = {w: (h.incarnation, h.is_accepting) for w, h in client.pool.workers.items()}
        tokens = await serve_one(client, worker) if after == before else []
        return client, after, tokens
    finally:
        worker.close()
        await client.stop(shutdown_workers=False)


def test_a_peer_without_the_key_changes_nothing_in_the_router(builtin_model_dir):
    key = generate_key()
    client, pool, tokens = asyncio.run(run(builtin_model_dir, key))
    assert list(pool) == ["w0"]  # no "evil", w0 not replaced, not draining
    assert pool["w0"][1] is True
    assert client.max_model_len > 1
    assert tokens == [10, 11, 12]  # the real worker, holding the key, still serves


def test_control_without_curve_the_same_peer_takes_over(builtin_model_dir):
    _, pool, _ = asyncio.run(run(builtin_model_dir, None))
    assert "evil" in pool  # the forged Register got in: what CURVE prevents


def test_a_key_holder_cannot_register_nonsense(builtin_model_dir):
    """Past CURVE, the router still checks a `Register` (ipc/validate.py): an unknown
    role, `max_model_len: 1` or another model's KV layout would break every request."""

    async def main():
        key = generate_key()
        client = ClusterClient(builtin_model_dir, "tcp://127.0.0.1:0", cluster_key=key)
        await client.start()
        worker = FakeWorker(client.ctx, client.router_addr, "w0", "mixed", key)
        try:
            bad = forged_messages()[1:3]  # max_model_len 1; role "x"
            bad.append(msgspec.structs.replace(forged_messages()[0], kv_layout=LAYOUT_OF_ANOTHER))
            for message in bad:
                worker.send(message)
            # A sound registration under another id, on the same ordered socket: once it is
            # in, the router has handled (and refused) every message before it.
            sound = forged_messages()[0]
            worker.send(msgspec.structs.replace(sound, worker_id="marker", kv_layout=LAYOUT))
            for _ in range(300):
                if client.pool.workers:
                    break
                await asyncio.sleep(0.01)
            assert list(client.pool.workers) == ["marker"]
            assert client.max_model_len == 4096
        finally:
            worker.close()
            await client.stop(shutdown_workers=False)

    asyncio.run(main())


LAYOUT_OF_ANOTHER = m.KVLayout(2, 256, 16, 2, 8, "float32")
