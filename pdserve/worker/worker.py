"""A worker process: one engine core in a role, driven over ZeroMQ.

Sockets (all bound to `host`, 127.0.0.1 by default, on free ports):
- `ctrl` (PULL): commands from the router (`AddRequest`, `ReserveKV`, `PrefillRequest`,
  `Abort`, `Shutdown`);
- `kv` (PULL): KV batches and `KVDone`s from prefill workers;
- `out` (PUSH, connected to the router): `Register`, `StepOutputs`, `KVReserved`,
  `KVEvents`, ...
A heartbeat thread with its own socket sends `WorkerStats` every second, so the router
sees the worker alive during a long prefill step; each beat says how long the engine loop
has not completed a pass (`loop_stalled_s`), so a hung loop is seen too (the router's
lease, control/membership.py).

Failure handling:
- a step that raises fails its requests as *retryable* (`RequestFailed`): the router moves
  them elsewhere; a request whose own parameters break the sampler fails alone (the
  engine samples row by row then, engine/model_runner.py); the process keeps serving;
- `Fence` (the router declared this incarnation dead): every request is dropped without
  writing more KV and the worker registers again under a new incarnation;
- SIGTERM: the worker tells the router it is `Draining` and keeps serving while the
  router moves its requests away; it exits on `Shutdown`, or once idle, or after
  `DRAIN_GRACE_S`; a second SIGTERM (or SIGINT) exits at once;
- the output socket never blocks the loop: if the router stops reading (it died), the
  queue fills, messages are dropped and every request is aborted (nobody is waiting).

Roles are what the router sends, not different code: a `prefill` worker gets
`PrefillRequest`s, a `decode` worker `ReserveKV`s (and `AddRequest`s for prompts it
prefills itself), a `mixed` worker anything; `SetRole` changes the role at runtime (the
router drains the worker first) and keeps the pool, its blocks and the prefix cache. On a
CPU every role puts its KV pool in shared memory (for the `shm` backend), so any worker
can become a decode worker that prefill workers write into.

The loop: take every waiting message, admit reservations that now fit, expire what timed
out, run one engine step, report (outputs, then the step's KV events).

KV events (the router's prefix index): the block manager always logs them in a worker;
the `KVEventPublisher` (worker/kv_events.py) sends a snapshot right after `Register`, on
the same ordered socket, then one numbered `KVEvents` batch per loop pass that changed a
tier, and a fresh snapshot whenever the router asks (`SendKVSnapshot`). More tiers plug
in with `worker.kv_events.add_source(...)`. Reservation and hand-off bookkeeping lives in
`worker/handoff.py`; this module owns sockets and the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.core import EngineCore
from pdserve.errors import PdserveError
from pdserve.ipc import messages as m
from pdserve.ipc import security
from pdserve.transfer.backends import make_sender
from pdserve.transfer.base import KVReceiver, PeerSockets
from pdserve.transfer.shm import TORCH_DTYPES, create_shared_pool, shm_pool_path
from pdserve.transfer.streamer import KVStreamer
from pdserve.worker.handoff import HandOffs
from pdserve.worker.kv_events import CallableEvents, DeviceEvents, KVEventPublisher
from pdserve.worker.liveness import LivenessFile, LoopClock

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "mixed")
HEARTBEAT_S = 1.0
OUT_QUEUE_MESSAGES = 100_000  # queued for a router that stopped reading, then dropped
DRAIN_GRACE_S = 30.0  # after SIGTERM, exit by then even if the router never says Shutdown
DRAIN_IDLE_S = 1.0  # after SIGTERM, exit once idle this long (no router, or it moved all)
MAX_CONSECUTIVE_LOOP_ERRORS = 5  # then the state is beyond repair: exit, to be restarted
REANNOUNCE_EVERY = 5  # heartbeats
STATS_MIN_INTERVAL_S = 0.02
TIER_STATS_INTERVAL_S = 0.5


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


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        if config.role not in ROLES:
            raise PdserveError(f"role must be one of {ROLES}, got {config.role!r}")
        self.config = config
        self.role = config.role  # changes at runtime (`SetRole`); the pool stays
        self.worker_id = config.worker_id
        self.ctx = zmq.Context()
        self.cluster_key = (
            security.load_key_file(config.cluster_key_file) if config.cluster_key_file else None
        )
        if self.cluster_key is None:
            security.warn_insecure(f"worker {self.worker_id}")
        self._auth = security.secure_context(self.ctx, self.cluster_key)
        is_mac = config.kv_transport_security == "mac" and self.cluster_key is not None
        self.kv_mac = security.KVMac(self.cluster_key) if is_mac else None
        self.ctrl = self._bind(zmq.PULL)
        self.kv = self._bind(zmq.PULL, is_plain=is_mac)
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.setsockopt(zmq.SNDHWM, OUT_QUEUE_MESSAGES)
        self.out.connect(config.router_addr)
        self.incarnation = uuid.uuid4().hex
        self.drain_started: float | None = None  # SIGTERM: draining since
        self._idle_since: float | None = None
        self._drain_announced = False
        self._num_dropped = 0
        self._is_router_gone = False
        self.shm_path: Path | None = None
        self.core = self._make_core()
        self.core.warmup()  # before registering: the first request must not pay for it
        self.loop_clock = LoopClock(self.core.predicted_max_step_s)
        self.layout = self._layout()
        self.peers = PeerSockets(self.ctx, kv_mac=self.kv_mac)
        kv_cache = self.core.runner.kv_cache
        senders = {
            name: make_sender(name, kv_cache, self.layout, self.peers, **self._options(name))
            for name in config.backends
        }
        self.core.kv_streamer = KVStreamer(
            senders, self.layout.num_layers, self.layout.block_size, config.kv_layerwise
        )
        self.handoffs = HandOffs(self.worker_id, self.core, senders, KVReceiver(kv_cache))
        self.kv_events = KVEventPublisher(self.worker_id, [DeviceEvents(self.core.block_manager)])
        tiers = getattr(self.core, "kv_tiers", None)  # host / disk / redis (kvstore/)
        if tiers is not None:
            self.kv_events.add_source(CallableEvents(tiers.drain_events, tiers.snapshot_events))
        self.is_running = True
        self._stats = m.WorkerStats(
            self.worker_id, 0, 0, 0, self.layout.num_blocks, incarnation=self.incarnation
        )
        self._stats_sent = 0.0
        self._tier_stats: dict = {}
        self._tier_stats_time = -1e9

    def _options(self, backend: str) -> dict:
        if backend == "nixl":  # agent names must be unique, also across restarts
            return {"agent_name": f"{self.worker_id}-{os.getpid()}"}
        return {}

    def _bind(self, kind: int, is_plain: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock = security.plain(sock) if is_plain else security.as_server(sock, self.cluster_key)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind_to_random_port(f"tcp://{self.config.host}")
        return sock

    def _make_core(self) -> EngineCore:
        config = self.config
        model_config = ModelConfig.from_pretrained(config.model_dir)
        allocator = None
        # Every role's pool is shared (shm backend): a prefill worker may become a decode
        # worker at runtime (`SetRole`) and then needs prefill workers to write into it.
        is_cpu = config.engine.device == "cpu"
        if "shm" in config.backends and (is_cpu or config.role != "prefill"):
            if config.engine.device != "cpu":
                raise PdserveError(
                    "the shm transfer backend needs the KV pool in host memory; "
                    "use backend tcp (or nixl) on accelerators"
                )
            self.shm_path = shm_pool_path(config.worker_id)
            allocator = self._shared_allocator(model_config)
        engine = config.engine
        if engine.kv_disk_cache_dir:
            # Each worker owns a subfolder (its id): a restarted worker finds its own blocks
            # and no two processes clean up or cap each other's files.
            folder = str(Path(engine.kv_disk_cache_dir) / config.worker_id)
            engine = dataclasses.replace(engine, kv_disk_cache_dir=folder)
        if engine.kv_redis_url and self.cluster_key is not None:
            # Every worker of the cluster shares the Redis MAC key through the cluster key.
            engine = dataclasses.replace(engine, kv_tier_secret=self.cluster_key.kv_tier_secret())
        return EngineCore(config.model_dir, model_config, engine, allocator)

    def _shared_allocator(self, model_config: ModelConfig):
        def allocate(num_blocks: int):
            layout = m.KVLayout(
                model_config.num_layers,
                num_blocks,
                self.config.engine.block_size,
                model_config.num_kv_heads,
                model_config.head_dim,
                self.config.engine.dtype,
            )
            return create_shared_pool(self.shm_path, layout)

        return allocate

    def _layout(self) -> m.KVLayout:
        shape = self.core.runner.kv_cache.shape
        dtype = next(k for k, v in TORCH_DTYPES.items() if v == self.core.runner.kv_cache.dtype)
        return m.KVLayout(shape[0], shape[2], shape[3], shape[4], shape[5], dtype)

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        self.loop_clock.restart()  # loading and warm-up are not a stalled loop
        self._announce()
        heartbeat = threading.Thread(target=self._heartbeat, daemon=True)
        heartbeat.start()
        poller = zmq.Poller()
        poller.register(self.ctrl, zmq.POLLIN)
        poller.register(self.kv, zmq.POLLIN)
        parent = os.getppid()
        num_errors = 0
        try:
            while self.is_running:
                try:
                    self._loop_pass(poller)
                    num_errors = 0
                except Exception:  # never let one bad pass take the process down
                    num_errors += 1
                    logger.exception("worker %s: loop pass failed", self.worker_id)
                    self._fail_everything("the worker's engine loop failed")
                    if num_errors >= MAX_CONSECUTIVE_LOOP_ERRORS:
                        raise
                self.loop_clock.completed_pass()
                if os.getppid() != parent:
                    logger.warning("parent process exited; worker %s stops", self.worker_id)
                    break
                if self._drain_is_over():
                    break
        finally:
            self.close()

    def _loop_pass(self, poller: zmq.Poller) -> None:
        busy = self.core.has_unfinished_requests()
        events = dict(poller.poll(0 if busy else 50))
        if self.kv in events:
            self._drain(self.kv, self._on_kv, self.kv_mac)
        if self.ctrl in events:
            self._drain(self.ctrl, self._on_ctrl)
        self._flush(self.handoffs.tick())
        if self.core.has_unfinished_requests():
            outputs = self.core.step()
            self._flush(self.handoffs.after_step(outputs))
            self._flush(self.handoffs.on_failures(self.core.take_failures()))
        self._publish_kv_events()
        self._update_stats()
        if self._is_router_gone:
            self._is_router_gone = False
            self.handoffs.drop_all()

    def _fail_everything(self, message: str) -> None:
        """After an error outside any one request: drop every request as retryable (the
        router moves them) and report, keeping the process."""
        with contextlib.suppress(Exception):
            self.core.fail_all(message)
            self._flush(self.handoffs.on_failures(self.core.take_failures()))

    def _announce(self) -> None:
        self._send(self._register_message())
        self._send(self.kv_events.snapshot())

    def start_draining(self) -> None:
        """SIGTERM (a signal handler: only flags; the loop tells the router)."""
        if self.drain_started is not None:
            raise KeyboardInterrupt  # a second SIGTERM: exit now
        self.drain_started = time.monotonic()

    def _drain_is_over(self) -> bool:
        if self.drain_started is None:
            return False
        if not self._drain_announced:
            self._drain_announced = True
            logger.info("worker %s draining (SIGTERM)", self.worker_id)
            self._send(m.Draining(self.worker_id, self.incarnation))
        now = time.monotonic()
        if now - self.drain_started > DRAIN_GRACE_S:
            return True
        if self.core.has_unfinished_requests() or self.handoffs.num_pending:
            self._idle_since = None
            return False
        self._idle_since = self._idle_since or now
        return now - self._idle_since > DRAIN_IDLE_S

    def _drain(self, sock: zmq.Socket, handle, mac: security.KVMac | None = None) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if mac is not None and (frames := mac.open(frames)) is None:
                logger.warning("dropping a KV message that fails its MAC (not from the cluster)")
                continue
            try:
                message = m.decode(frames[0].buffer)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                logger.warning("dropping a malformed message: %s", e)
                continue
            handle(message, frames[1:])

    def _on_ctrl(self, message: m.Message, frames) -> None:
        if isinstance(message, m.Shutdown):
            self.is_running = False
            return
        if isinstance(message, m.Fence):
            self._on_fence(message)
            return
        if isinstance(message, m.SetRole):
            self._on_set_role(message)
            return
        if isinstance(message, m.SendKVSnapshot):
            self._send(self.kv_events.snapshot())
            return
        self._flush(self.handoffs.on_command(message))

    def _on_set_role(self, message: m.SetRole) -> None:
        if message.role not in ROLES:
            logger.warning("ignoring SetRole to unknown role %r", message.role)
            return
        logger.info("worker %s: role %s -> %s", self.worker_id, self.role, message.role)
        self.role = message.role
        self._send(self._register_message())  # same incarnation, new role

    def _on_fence(self, message: m.Fence) -> None:
        """The router declared this incarnation dead and moved its requests: drop them
        all (no more KV is written for them) and join again as a new incarnation."""
        if message.incarnation != self.incarnation:
            return  # about an incarnation this process already left behind
        logger.warning("worker %s was fenced by the router; rejoining", self.worker_id)
        self.handoffs.drop_all()
        self.incarnation = uuid.uuid4().hex
        self._stats = msgspec.structs.replace(self._stats, incarnation=self.incarnation)
        self._announce()

    def _on_kv(self, message: m.Message, frames) -> None:
        if isinstance(message, m.KVLayer):
            self.handoffs.on_kv_layer(message, [f.buffer for f in frames])
        elif isinstance(message, m.KVDone):
            self.handoffs.on_kv_done(message)

    def _publish_kv_events(self) -> None:
        message = self.kv_events.poll()
        if message is not None:
            self._send(message)

    def _flush(self, messages: list[m.Message]) -> None:
        for message in messages:
            self._send(message)

    def _send(self, message: m.Message) -> None:
        try:
            self.out.send(m.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            self._on_router_gone()

    def _on_router_gone(self) -> None:
        """The router has not read `OUT_QUEUE_MESSAGES` messages: it is gone. Nobody will
        read these requests' outputs; stop computing them (a new router fences us)."""
        self._num_dropped += 1
        if self._num_dropped == 1 or self._num_dropped % 1000 == 0:
            logger.error("worker %s: router not reading; dropping output", self.worker_id)
        self._is_router_gone = True  # the loop drops every request after this pass

    # ---- registration and load -------------------------------------------------------------

    def _register_message(self) -> m.Register:
        return m.Register(
            worker_id=self.worker_id,
            role=self.role,
            pid=os.getpid(),
            ctrl_addr=self._advertised(self.ctrl),
            kv_addr=self._advertised(self.kv),
            kv_layout=self.layout,
            max_model_len=self.core.max_model_len,
            backends=list(self.config.backends),
            hostname=socket.gethostname(),
            shm_path=str(self.shm_path) if self.shm_path else None,
            nixl=self._nixl_info(),
            incarnation=self.incarnation,
        )

    def _nixl_info(self) -> m.NixlPeer | None:
        sender = self.core.kv_streamer.senders.get("nixl")
        return sender.peer_info() if sender is not None else None

    def _advertised(self, sock: zmq.Socket) -> str:
        """The address peers should connect to: the bound one, with a wildcard interface
        replaced by `advertise_host` (or this host's name)."""
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        scheme_host, _, port = endpoint.rpartition(":")
        if scheme_host.endswith(("0.0.0.0", "[::]", "*")):
            host = self.config.advertise_host or socket.gethostname()
            return f"tcp://{host}:{port}"
        return endpoint

    def _update_stats(self) -> None:
        """Refresh the heartbeat's snapshot; send it now too when it changed (at most
        every `STATS_MIN_INTERVAL_S`), so the router's view of load and free blocks is fresh."""
        stats = self._current_stats()
        if stats != self._stats and time.monotonic() - self._stats_sent > STATS_MIN_INTERVAL_S:
            self._send(stats)
            self._stats_sent = time.monotonic()
        self._stats = stats

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

    def _heartbeat(self) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.connect(self.config.router_addr)
        health = LivenessFile(self.config.health_file) if self.config.health_file else None
        try:
            for beat in itertools.count():
                if not self.is_running:
                    break
                with contextlib.suppress(zmq.Again):
                    if beat % REANNOUNCE_EVERY == REANNOUNCE_EVERY - 1:
                        # A restarted router learns of this worker.
                        sock.send(m.encode(self._register_message()), zmq.NOBLOCK)
                    clock = self.loop_clock
                    beat_stats = msgspec.structs.replace(
                        self._stats,
                        loop_stalled_s=clock.stalled_s(),
                        loop_pass_max_s=clock.pass_max_s(),
                    )
                    sock.send(m.encode(beat_stats), zmq.NOBLOCK)
                if health is not None:
                    health.stamp(self.loop_clock.last_pass)
                time.sleep(HEARTBEAT_S)
        except zmq.ZMQError:
            pass  # context closed at shutdown
        finally:
            sock.close()
            if health is not None:
                health.remove()

    def close(self) -> None:
        self.is_running = False
        try:
            self.core.close()  # stop the KV tier writer; persist what RAM tiers hold
        except Exception:  # a failed persist must not leave sockets and shm behind
            logger.exception("worker %s: persisting KV tiers failed", self.worker_id)
        for sender in self.core.kv_streamer.senders.values():
            sender.close()
        self.peers.close()
        for sock in (self.ctrl, self.kv, self.out):
            sock.close()
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()
        if self.shm_path is not None:
            self.shm_path.unlink(missing_ok=True)


def run_worker(config: WorkerConfig) -> None:
    """Entry point of `pdserve worker`: SIGTERM drains (a second one stops at once);
    SIGINT stops the loop cleanly."""
    worker: Worker | None = None

    def on_sigterm(signum, frame):
        if worker is None:
            raise KeyboardInterrupt  # still loading: nothing to drain
        worker.start_draining()

    signal.signal(signal.SIGTERM, on_sigterm)
    with contextlib.suppress(KeyboardInterrupt):
        worker = Worker(config)
        logger.info("worker %s (%s) ready", config.worker_id, config.role)
        worker.run()
