"""Fake workers that speak the real protocol over ZeroMQ, scripted by the test.

A `FakeWorker` binds its command socket and reports to a real `ClusterClient`, but runs
no engine: the test reads the commands the router sent (`next_command`) and makes the
worker answer (`emit`, `reserved`, `failed`, `stats`). So router behaviour — migration,
fencing, stale outputs — is tested exactly, fast, and without timing luck.
"""

from __future__ import annotations

import asyncio
import uuid

import zmq
import zmq.asyncio

from pdserve.ipc import messages as m
from pdserve.ipc.security import ClusterKey, as_server

# The built-in model's KV shape: the router refuses a registration for another model.
LAYOUT = m.KVLayout(8, 256, 16, 4, 64, "float32")


class FakeWorker:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        router_addr: str,
        worker_id: str,
        role: str,
        key: ClusterKey | None,
    ):
        """`ctx` made CURVE clients of its sockets (`secure_context`) when `key` is set."""
        self.worker_id = worker_id
        self.role = role
        self.ctrl = as_server(ctx.socket(zmq.PULL), key)
        self.ctrl.setsockopt(zmq.LINGER, 0)
        self.port = self.ctrl.bind_to_random_port("tcp://127.0.0.1")
        self.out = ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 0)
        self.out.connect(router_addr)
        self.incarnation = uuid.uuid4().hex

    def register(self) -> None:
        self.send(
            m.Register(
                self.worker_id,
                self.role,
                1,
                f"tcp://127.0.0.1:{self.port}",
                "tcp://127.0.0.1:1",
                LAYOUT,
                4096,
                ["tcp"],
                incarnation=self.incarnation,
            )
        )
        self.stats()

    def stats(
        self, num_running: int = 0, loop_stalled_s: float = 0.0, loop_pass_max_s: float = 0.0
    ) -> None:
        self.send(
            m.WorkerStats(
                self.worker_id,
                num_running,
                0,
                LAYOUT.num_blocks,
                LAYOUT.num_blocks,
                loop_stalled_s=loop_stalled_s,
                loop_pass_max_s=loop_pass_max_s,
                incarnation=self.incarnation,
            )
        )

    def send(self, message: m.Message) -> None:
        self.out.send(m.encode(message))

    def emit(
        self,
        request_id: str,
        token_ids: list[int],
        finish_reason: str | None = None,
        first_index: int | None = None,
    ):
        out = m.CoreOutput(
            request_id, token_ids, finish_reason=finish_reason, first_index=first_index
        )
        self.send(m.StepOutputs(self.worker_id, [out]))

    def reserved(self, request_id: str, transfer_id: str, num_blocks: int = 2) -> None:
        self.send(m.KVReserved(self.worker_id, request_id, transfer_id, list(range(num_blocks))))

    def failed(self, request_id: str, message: str, retryable: bool) -> None:
        self.send(m.RequestFailed(self.worker_id, request_id, message, retryable))

    async def next_command(self, timeout: float = 5.0, skip=(m.SendKVSnapshot,)) -> m.Message:
        """The next command from the router (snapshot requests skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                message = m.decode(await self.ctrl.recv())
                if not isinstance(message, skip):
                    return message

    async def no_command(self, wait: float = 0.3, skip=(m.SendKVSnapshot,)) -> None:
        """Assert the router sends nothing (but `skip`) for `wait` seconds."""
        try:
            message = await self.next_command(wait, skip)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected command {message}")

    def close(self) -> None:
        self.ctrl.close(0)
        self.out.close(0)
