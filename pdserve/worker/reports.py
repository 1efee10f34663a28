"""`Reports`: what a worker tells the router about itself — who it is and how loaded.

- `Register`: id, role, incarnation, addresses, KV layout and transfer backends. Sent at
  start, after a role switch and after a fence; the heartbeat repeats it every
  `REANNOUNCE_EVERY` beats, so a restarted router learns of the worker.
- `WorkerStats`: load, free blocks, prefix hits and KV tier counters. The loop refreshes
  them every pass and sends them at once when they changed (at most every
  `STATS_MIN_INTERVAL_S`); the heartbeat thread sends the latest every `HEARTBEAT_S`, with
  how long the loop has not completed a pass, so the router sees a worker alive during a
  long step and sees a hung loop too (control/membership.py).

The role and the incarnation live here because they are what these reports say: the
loop changes them (`SetRole`, `Fence`) and the heartbeat thread reads them. The loop's
sockets stay in worker/worker.py; the heartbeat has its own.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
import uuid
from collections.abc import Callable

import msgspec
import zmq

from pdserve.engine.core import EngineCore
from pdserve.ipc import messages as m
from pdserve.worker.build import WorkerConfig
from pdserve.worker.handoff import HandOffs
from pdserve.worker.liveness import LivenessFile, LoopClock

HEARTBEAT_S = 1.0
REANNOUNCE_EVERY = 5  # heartbeats
STATS_MIN_INTERVAL_S = 0.02
TIER_STATS_INTERVAL_S = 0.5


class Reports:
    def __init__(
        self,
        config: WorkerConfig,
        core: EngineCore,
        layout: m.KVLayout,
        handoffs: HandOffs,
        addrs: tuple[str, str],
        shm_path: str | None,
    ) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.role = config.role  # changes at runtime (`SetRole`); the pool stays
        self.incarnation = uuid.uuid4().hex
        self.core = core
        self.layout = layout
        self.handoffs = handoffs
        self.ctrl_addr, self.kv_addr = addrs
        self.shm_path = shm_path
        self.stats = m.WorkerStats(
            self.worker_id, 0, 0, 0, layout.num_blocks, incarnation=self.incarnation
        )
        self._stats_sent = 0.0
        self._tier_stats: dict = {}
        self._tier_stats_time = -1e9

    def new_incarnation(self) -> None:
        """Fenced: join again as a process the router has not declared dead."""
        self.incarnation = uuid.uuid4().hex
        self.stats = msgspec.structs.replace(self.stats, incarnation=self.incarnation)

    def register_message(self) -> m.Register:
        return m.Register(
            worker_id=self.worker_id,
            role=self.role,
            pid=os.getpid(),
            ctrl_addr=self.ctrl_addr,
            kv_addr=self.kv_addr,
            kv_layout=self.layout,
            max_model_len=self.core.max_model_len,
            backends=list(self.config.backends),
            hostname=socket.gethostname(),
            shm_path=self.shm_path,
            nixl=self._nixl_info(),
            incarnation=self.incarnation,
        )

    def _nixl_info(self) -> m.NixlPeer | None:
        sender = self.core.kv_streamer.senders.get("nixl")
        return sender.peer_info() if sender is not None else None

    # ---- load ------------------------------------------------------------------------------

    def update_stats(self) -> m.WorkerStats | None:
        """Refresh the heartbeat's snapshot; the stats to send now too when they changed
        (at most every `STATS_MIN_INTERVAL_S`), so the router's view of load and free
        blocks is fresh."""
        stats = self._current_stats()
        due = None
        if stats != self.stats and time.monotonic() - self._stats_sent > STATS_MIN_INTERVAL_S:
            due = stats
            self._stats_sent = time.monotonic()
        self.stats = stats
        return due

    def _current_stats(self) -> m.WorkerStats:
        scheduler = self.core.scheduler
        return m.WorkerStats(
            self.worker_id,
            num_running=scheduler.num_running + len(scheduler.reserved),
            num_waiting=scheduler.num_waiting + self.handoffs.num_pending,
            num_free_blocks=self.core.block_manager.num_free_blocks,
            num_blocks=self.core.block_manager.num_blocks,
            num_waiting_prefill_tokens=scheduler.num_waiting_prefill_tokens,
            num_prefix_query_tokens=scheduler.num_prefix_query_tokens,
            num_prefix_hit_tokens=scheduler.num_prefix_hit_tokens,
            incarnation=self.incarnation,
            **self._tier_counters(),
        )

    def _tier_counters(self) -> dict:
        """Tier counters for the stats, refreshed at most every `TIER_STATS_INTERVAL_S`:
        this runs once per engine step, and the counters only feed metrics."""
        tiers = self.core.kv_tiers
        if tiers is None:
            return {}
        now = time.monotonic()
        if now - self._tier_stats_time < TIER_STATS_INTERVAL_S:
            return self._tier_stats
        self._tier_stats_time = now
        stats = tiers.store.stats()
        counters = [
            m.KVTierCounters(
                name,
                t.num_blocks,
                t.used_bytes,
                t.num_hit_blocks,
                t.read_bytes,
                t.written_bytes,
                t.num_corrupt_blocks,
                stats.admission,
                t.num_admitted_blocks,
                t.num_rejected_blocks,
                t.num_lookup_blocks,
            )
            for name, t in stats.tiers.items()
        ]
        self._tier_stats = {
            "kv_tiers": counters,
            "num_tier_dropped_writes": stats.num_dropped_writes,
        }
        return self._tier_stats

    # ---- the heartbeat thread --------------------------------------------------------------

    def heartbeat(
        self, ctx: zmq.Context, loop_clock: LoopClock, is_running: Callable[[], bool]
    ) -> None:
        """Until `is_running()` is false: the latest stats every `HEARTBEAT_S` on a socket
        of its own, and the health file stamped (worker/liveness.py)."""
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.connect(self.config.router_addr)
        health_file = self.config.health_file
        health = LivenessFile(health_file) if health_file else None
        try:
            for beat in itertools.count():
                if not is_running():
                    break
                with contextlib.suppress(zmq.Again):
                    if beat % REANNOUNCE_EVERY == REANNOUNCE_EVERY - 1:
                        # A restarted router learns of this worker.
                        sock.send(m.encode(self.register_message()), zmq.NOBLOCK)
                    beat_stats = msgspec.structs.replace(
                        self.stats,
                        loop_stalled_s=loop_clock.stalled_s(),
                        loop_pass_max_s=loop_clock.pass_max_s(),
                    )
                    sock.send(m.encode(beat_stats), zmq.NOBLOCK)
                if health is not None:
                    health.stamp(loop_clock.last_pass)
                time.sleep(HEARTBEAT_S)
        except zmq.ZMQError:
            pass  # context closed at shutdown
        finally:
            sock.close()
            if health is not None:
                health.remove()


def advertised(sock: zmq.Socket, advertise_host: str | None) -> str:
    """The address peers should connect to: the bound one, with a wildcard interface
    replaced by `advertise_host` (or this host's name)."""
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    scheme_host, _, port = endpoint.rpartition(":")
    if scheme_host.endswith(("0.0.0.0", "[::]", "*")):
        host = advertise_host or socket.gethostname()
        return f"tcp://{host}:{port}"
    return endpoint
