"""`pdserve serve --launcher ray --router-on-ray`: the router in a Ray actor, and this
process its supervisor.

The router actor (`RouterActor`) runs what `pdserve serve` runs in-process otherwise —
HTTP server, ZeroMQ control socket, the `RayLauncher` and its watchdog, the planner — on a
thread of its own inside the actor (signals and uvloop belong to a main thread; Ray's
threaded actor keeps its methods answering beside it). The actor creates the worker actors,
so it *owns* them: scale in/out and role switches go through the same launcher unchanged,
and when the router actor dies Ray ends its workers with it (no orphan can keep writing KV
for a router that is gone; their files are swept by the next actor on their node).

Placement: `router_resources` (num_cpus, custom resources, node labels) on the actor; Ray
picks any node that has them. The HTTP server binds `host` *on the actor's node*:
127.0.0.1 (the default) reaches it from that node only; `host: node-ip` binds the IP Ray
knows the node by; `0.0.0.0` every interface. The printed URL names the node's IP for
both. Paths in the config (model folder, API keys file, planner profile) must exist on the
router's node too.

Keys: the cluster key (from `cluster_key_file`, else a fresh one) and the config (it holds
API keys) reach the actor as hidden constructor arguments (`Secret`), never in argv, logs
or Ray's actor table; the actor writes the key 0600 into a 0700 folder on its node.

Lifecycle: the supervisor prints the router's URL once its workers are ready, forwards
SIGINT/SIGTERM as `stop()` (HTTP stops, workers get `Shutdown`, their actors end, the key
folder goes) and then kills the actor. When the router actor dies, Ray restarts it up to
`router_max_restarts` times: the constructor runs again and brings up the router with fresh
workers (clients of the dead one lose their connections, as with any router crash); the
supervisor says so and prints the URL again. Once Ray gives up, the supervisor exits 1
with the cause. If the supervisor itself dies, Ray ends the router actor (its owner) and
with it every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pdserve.control.ray_config import is_loopback
from pdserve.control.ray_worker_host import Secret, mark_owner, private_folder, write_private
from pdserve.errors import PdserveError
from pdserve.serve import (
    ProcessHooks,
    bind_http,
    cluster_key_file_of,
    event_loop_factory,
    exit_code_of,
    serve_router,
    setup_logging,
)
from pdserve.serve_config import NODE_IP, ServeConfig

logger = logging.getLogger("pdserve.serve.ray")

STOP_TIMEOUT_S = 60.0
POLL_S = 0.2
PENDING_HINT_S = 10.0  # say so when the router actor has no node for this long
WILDCARDS = ("0.0.0.0", "::", "[::]", NODE_IP)


class RouterActor(ProcessHooks):
    """One router inside a Ray actor (module docstring); started by its constructor, so a
    restarted actor serves again without being asked."""

    def __init__(self, config: Secret, key: Secret | None) -> None:
        import ray

        super().__init__(config.value)
        setup_logging(self.config)  # this process's own: Ray configures only its loggers
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.folder = private_folder()
        mark_owner(self.folder, os.getpid())
        self.key_file = write_private(self.folder / "cluster.key", key.value) if key else None
        self.details: dict[str, Any] | None = None  # set once the workers are ready
        self.exit_code: int | None = None
        self.error: str | None = None
        self._is_ready = threading.Event()
        self._is_done = threading.Event()
        self._lock = threading.Lock()  # `stop` vs the server appearing
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._is_stopping = False
        threading.Thread(target=self._run, name="pdserve-router", daemon=True).start()

    # ---- called through Ray ----------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        """The URL and where the router runs, once its workers are ready; raises if it
        stopped first."""
        self._is_ready.wait()
        if self.details is None:
            raise PdserveError(
                self.error or f"the router stopped during start-up (exit {self.exit_code})"
            )
        return self.details

    def wait(self) -> int:
        """The router's exit code, once it stops by itself."""
        self._is_done.wait()
        return self.exit_code

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Stop the HTTP server; the router then stops its workers (their actors end)."""
        with self._lock:
            self._is_stopping = True
            if self._server is not None and not self._is_done.is_set():
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                    self._loop.call_soon_threadsafe(setattr, self._server, "should_exit", True)
        self._is_done.wait(timeout_s)
        return self.exit_code

    # ---- ProcessHooks ----------------------------------------------------------------------

    def on_server(self, server) -> None:
        with self._lock:
            self._server, self._loop = server, asyncio.get_running_loop()
            server.should_exit = self._is_stopping

    def on_ready(self, details: str) -> None:
        host = self.node_ip if self.config.host in WILDCARDS else self.config.host
        self.details = {
            "url": f"http://{host}:{self.config.port}",
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "pid": os.getpid(),
            "about": details,
        }
        self._is_ready.set()

    # ---- the router's thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                self.exit_code = runner.run(_serve_in_actor(self))
        except (Exception, SystemExit) as e:  # bind_http raises SystemExit with its message
            self.error = str(e).removeprefix("error: ")
            self.exit_code = 1
            logger.error("router: %s", e)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._is_done.set()
            self._is_ready.set()


async def _serve_in_actor(actor: RouterActor) -> int:
    """The router of `actor`. Not a method: Ray makes an actor with a coroutine method an
    async actor, whose blocking calls (`ready`, `wait`) would stall one another."""
    from pdserve.model.builtin import ensure_builtin_model

    config = actor.config
    model_dir = Path(config.model) if config.model else ensure_builtin_model(progress=False)
    host = actor.node_ip if config.host == NODE_IP else config.host
    http_sock = bind_http(host, config.port)
    return await serve_router(config, model_dir, http_sock, actor.key_file, actor)


def run_serve_on_ray(config: ServeConfig) -> int:
    """`pdserve serve` as the router actor's supervisor (module docstring)."""
    setup_logging(config)
    from pdserve.control.ray_launcher import connect

    def run() -> int:
        connect(config.ray_address)
        return Supervisor(config).run()

    return exit_code_of(config, run)


class Supervisor:
    """Starts the router actor, prints its URL, forwards signals, reports its death."""

    def __init__(self, config: ServeConfig) -> None:
        import ray

        self._ray = ray
        self.config = config
        self.name = f"pdserve-router-{uuid.uuid4().hex[:8]}"
        self.is_stopping = False
        self.num_restarts = 0
        self._placed = None  # ObjectRef: ready once Ray placed (and constructed) the actor
        self._placed_since = 0.0

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        router = self._create()
        try:
            code = self._supervise(router)
        finally:
            code_at_stop = self._stop(router)
        return (code_at_stop or 0) if code is None else code

    def _on_signal(self, signum, frame) -> None:
        logger.info("received %s; stopping the router actor", signal.Signals(signum).name)
        self.is_stopping = True

    def _create(self):
        key_file, temp_key = cluster_key_file_of(self.config)
        try:  # the key's content travels; the temporary file here is not needed after
            key = Secret(Path(key_file).read_bytes()) if key_file else None
        finally:
            if temp_key is not None:
                temp_key.remove()
        actor = self._ray.remote(RouterActor).options(**router_options(self.config, self.name))
        # the actor keeps its own copy of the path-free config: the key file is local here
        config = dataclasses.replace(self.config, cluster_key_file=None)
        return actor.remote(Secret(config), key)

    def _supervise(self, router) -> int | None:
        """None when a signal stopped it; else the exit code."""
        ref, phase = router.ready.remote(), "ready"
        self._watch_placement(router)
        while not self.is_stopping:
            done, _ = self._ray.wait([ref], timeout=POLL_S)
            if not done:
                self._hint_if_pending()
                continue
            try:
                value = self._ray.get(ref)
            except self._ray.exceptions.ActorDiedError as e:
                return _fail(f"the router actor died and Ray will not restart it: {_cause(e)}")
            except self._ray.exceptions.RayActorError as e:  # unavailable: Ray restarts it
                self._report_restart(e)
                ref, phase = router.ready.remote(), "ready"
                self._watch_placement(router)
                continue
            except self._ray.exceptions.RayTaskError as e:  # `ready` raised: start-up failed
                return _fail(_cause(e))
            if phase == "ready":
                self._print_ready(value)
                ref, phase = router.wait.remote(), "serving"
            else:
                return value if value == 0 else _fail(f"the router stopped (exit {value})")
        return None

    def _watch_placement(self, router) -> None:
        self._placed = router.__ray_ready__.remote()  # Ray's own: answers once constructed
        self._placed_since = time.monotonic()

    def is_placed(self) -> bool:
        return bool(self._ray.wait([self._placed], timeout=0)[0])

    def _hint_if_pending(self) -> None:
        """Once, after `PENDING_HINT_S`: the actor waits for a node with its resources."""
        if self._placed_since and time.monotonic() - self._placed_since > PENDING_HINT_S:
            self._placed_since = 0.0
            if not self.is_placed():
                wanted = self.config.router_placement()
                print(
                    f"pdserve: the router actor waits for a node with num_cpus "
                    f"{wanted.num_cpus:g}, resources {wanted.resources}, labels "
                    f"{wanted.label_selector} (router_resources)",
                    file=sys.stderr,
                    flush=True,
                )

    def _report_restart(self, error: Exception) -> None:
        self.num_restarts += 1
        limit = self.config.router_max_restarts
        print(
            f"pdserve: the router actor died ({_cause(error)}); Ray restarts it with fresh "
            f"workers (restart {self.num_restarts} of at most {limit})",
            file=sys.stderr,
            flush=True,
        )

    def _print_ready(self, details: dict[str, Any]) -> None:
        where = f"router actor {self.name} on {details['node_ip']}"
        elsewhere = details["node_id"] != self._ray.get_runtime_context().get_node_id()
        if elsewhere and is_loopback(self.config.host):
            where += ", loopback: from that node only"
        print(f"pdserve ready: {details['url']}/v1 ({details['about']}; {where})", flush=True)

    def _stop(self, router) -> int | None:
        code = None
        try:
            if self.is_placed():  # else nothing runs there yet: the kill is the stop
                code = self._ray.get(router.stop.remote(), timeout=STOP_TIMEOUT_S + 10)
        except Exception as e:  # dead already, or stuck: the kill below ends it
            logger.info("router actor: stop: %s", type(e).__name__)
        self._ray.kill(router, no_restart=True)
        return code


def router_options(config: ServeConfig, name: str) -> dict[str, Any]:
    """The router actor's Ray options: its placement, restarts, and threads for its calls."""
    wanted = config.router_placement()
    options: dict[str, Any] = {
        "name": name,
        "num_cpus": wanted.num_cpus,
        "max_restarts": config.router_max_restarts,
        "max_task_retries": 0,
        "max_concurrency": 4,  # ready, wait and stop block side by side
    }
    if wanted.resources:
        options["resources"] = dict(wanted.resources)
    if wanted.label_selector:
        options["label_selector"] = dict(wanted.label_selector)
    return options


def _cause(error: Exception) -> str:
    """One line: a task's own error, or Ray's first line on a dead actor and its reason."""
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    reasons = [line for line in lines[1:] if "because" in line]
    return " ".join(lines[:1] + reasons[:1])[:400] or type(error).__name__


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


__all__ = ["RouterActor", "Supervisor", "run_serve_on_ray"]
