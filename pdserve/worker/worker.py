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
in with `worker.kv_events.add_source(...)`.

This module owns the sockets, the loop and the commands it runs. The rest is in its own
files: the config and what is built from it (engine core, shared KV pool, senders) in
`worker/build.py`; registration, stats and the heartbeat thread in `worker/reports.py`;
reservation and hand-off bookkeeping in `worker/handoff.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import msgspec
import zmq

from pdserve.errors import PdserveError
from pdserve.ipc import messages as m
from pdserve.ipc import security
from pdserve.transfer.base import KVReceiver, PeerSockets
from pdserve.transfer.streamer import KVStreamer
from pdserve.worker.build import ROLES, WorkerConfig, kv_layout, make_core, make_senders
from pdserve.worker.handoff import HandOffs
from pdserve.worker.kv_events import CallableEvents, DeviceEvents, KVEventPublisher
from pdserve.worker.liveness import LoopClock
from pdserve.worker.reports import Reports, advertised

logger = logging.getLogger(__name__)

OUT_QUEUE_MESSAGES = 100_000  # queued for a router that stopped reading, then dropped
DRAIN_GRACE_S = 30.0  # after SIGTERM, exit by then even if the router never says Shutdown
DRAIN_IDLE_S = 1.0  # after SIGTERM, exit once idle this long (no router, or it moved all)
MAX_CONSECUTIVE_LOOP_ERRORS = 5  # then the state is beyond repair: exit, to be restarted


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        if config.role not in ROLES:
            raise PdserveError(f"role must be one of {ROLES}, got {config.role!r}")
        self.config = config
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
        self.drain_started: float | None = None  # SIGTERM: draining since
        self._idle_since: float | None = None
        self._drain_announced = False
        self._num_dropped = 0
        self._is_router_gone = False
        self.core, self.shm_path = make_core(config, self.cluster_key)
        self.core.warmup()  # before registering: the first request must not pay for it
        self.loop_clock = LoopClock(self.core.predicted_max_step_s)
        self.layout = kv_layout(self.core)
        self.peers = PeerSockets(self.ctx, kv_mac=self.kv_mac)
        senders = make_senders(config, self.core, self.layout, self.peers)
        self.core.kv_streamer = KVStreamer(
            senders, self.layout.num_layers, self.layout.block_size, config.kv_layerwise
        )
        kv_receiver = KVReceiver(self.core.runner.kv_cache)
        self.handoffs = HandOffs(self.worker_id, self.core, senders, kv_receiver)
        self.kv_events = KVEventPublisher(self.worker_id, [DeviceEvents(self.core.block_manager)])
        tiers = getattr(self.core, "kv_tiers", None)  # host / disk / redis (kvstore/)
        if tiers is not None:
            self.kv_events.add_source(CallableEvents(tiers.drain_events, tiers.snapshot_events))
        self.is_running = True
        addrs = (
            advertised(self.ctrl, config.advertise_host),
            advertised(self.kv, config.advertise_host),
        )
        shm_path = str(self.shm_path) if self.shm_path else None
        self.reports = Reports(config, self.core, self.layout, self.handoffs, addrs, shm_path)

    def _bind(self, kind: int, is_plain: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock = security.plain(sock) if is_plain else security.as_server(sock, self.cluster_key)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind_to_random_port(f"tcp://{self.config.host}")
        return sock

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        self.loop_clock.restart()  # loading and warm-up are not a stalled loop
        self._announce()
        heartbeat = threading.Thread(
            target=self.reports.heartbeat,
            args=(self.ctx, self.loop_clock, lambda: self.is_running),
            daemon=True,
        )
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
        stats = self.reports.update_stats()
        if stats is not None:
            self._send(stats)
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
        self._send(self.reports.register_message())
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
            self._send(m.Draining(self.worker_id, self.reports.incarnation))
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
        logger.info("worker %s: role %s -> %s", self.worker_id, self.reports.role, message.role)
        self.reports.role = message.role
        self._send(self.reports.register_message())  # same incarnation, new role

    def _on_fence(self, message: m.Fence) -> None:
        """The router declared this incarnation dead and moved its requests: drop them
        all (no more KV is written for them) and join again as a new incarnation."""
        if message.incarnation != self.reports.incarnation:
            return  # about an incarnation this process already left behind
        logger.warning("worker %s was fenced by the router; rejoining", self.worker_id)
        self.handoffs.drop_all()
        self.reports.new_incarnation()
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
