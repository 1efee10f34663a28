"""`pdserve serve`: the router and its workers on this machine, with one command.

Configuration comes from a YAML file (`--config`), then command-line flags override it;
every key is a `ServeConfig` field (engine settings under `engine:`, and per-role
overrides of them under `engine_prefill:` / `engine_decode:` / `engine_mixed:`). Defaults: the
built-in model, mode `auto`, one prefill and one decode worker, the CPU threads split
evenly between workers, HTTP on 127.0.0.1:8000.

Start-up: the HTTP server comes up first (`/health` answers, `/ready` says 503 while
workers load), then the workers start as child processes and register with the router;
when every one has, the URL is printed. Each worker gets its configuration as one
`WorkerSpec` file (control/worker_spec.py), with its role's engine settings. Shutdown (Ctrl-C or SIGTERM): HTTP stops, workers
get `Shutdown`, then SIGTERM, then SIGKILL if still alive; each child also dies with this
process (PR_SET_PDEATHSIG) and checks its parent, so no worker outlives the launcher.
Shared-memory KV pools of children are removed.

While serving, the watchdog (control/launcher.py) restarts a worker that exits, with
exponential backoff and no lifetime cap; a worker whose lease runs out (hung) is killed
and restarted the same way. Its requests migrate to the others (control/migration.py).

`serve_router` is the router's whole run; with `router_on_ray` it runs inside a Ray actor
instead of here (serve_ray.py), which is why what this process does around it (signals,
the printed URL) sits in `ProcessHooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pdserve.config import EngineConfig
from pdserve.control.launcher import LocalLauncher, Watchdog, python_module_command
from pdserve.control.planner import RequestLog
from pdserve.control.planner_loop import PlannerLoop
from pdserve.control.ray_config import is_loopback
from pdserve.control.worker_spec import SpecFolder, WorkerSpec
from pdserve.errors import PdserveError
from pdserve.ipc import security
from pdserve.serve_config import ServeConfig

logger = logging.getLogger("pdserve.serve")

READY_TIMEOUT_S = 300.0


# ---- the launcher -------------------------------------------------------------------------


def run_serve(config: ServeConfig) -> int:
    setup_logging(config)
    from pdserve.model.builtin import ensure_builtin_model

    model_dir = Path(config.model) if config.model else ensure_builtin_model(progress=True)
    http_sock = bind_http(config.host, config.port)

    def run() -> int:
        if config.launcher == "ray":
            from pdserve.control.ray_launcher import connect

            connect(config.ray_address)
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(_serve(config, model_dir, http_sock))

    return exit_code_of(config, run)


def setup_logging(config: ServeConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )


def exit_code_of(config: ServeConfig, run: Callable[[], int]) -> int:
    """`run()`'s exit code; a pdserve error or an unreachable Ray cluster is printed: 1."""
    try:
        return run()
    except PdserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConnectionError as e:  # ray.init: no cluster at ray_address
        print(f"error: cannot join the Ray cluster {config.ray_address!r}: {e}", file=sys.stderr)
        return 1


def event_loop_factory():
    """uvloop's loop when installed (a dependency): it accepts and answers connections
    ~1.5-2x faster than asyncio's under a burst (docs/benchmarks.md, Overload)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def bind_http(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


async def _serve(config: ServeConfig, model_dir: Path, http_sock: socket.socket) -> int:
    key_file, temp_key = cluster_key_file_of(config)
    try:
        return await serve_router(config, model_dir, http_sock, key_file, ProcessHooks(config))
    finally:
        if temp_key is not None:
            temp_key.remove()


class ProcessHooks:
    """What the process hosting the router does when its HTTP server exists and when the
    workers are ready: here, take the signals and print the URL. The router actor of
    `router_on_ray` (serve_ray.py) does both its own way."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config

    def on_server(self, server) -> None:
        # uvicorn handles SIGINT/SIGTERM while it serves and re-raises them afterwards; these
        # handlers receive that re-raise so shutdown continues below instead of dying mid-way.
        def on_signal(signum, frame) -> None:
            logger.info("received %s; shutting down", signal.Signals(signum).name)
            server.should_exit = True  # also covers a signal while workers are starting

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def on_ready(self, details: str) -> None:
        url = f"http://{self.config.host}:{self.config.port}"
        print(f"pdserve ready: {url}/v1 ({details})", flush=True)


async def serve_router(
    config: ServeConfig,
    model_dir: Path,
    http_sock: socket.socket,
    key_file: Path | None,
    hooks: ProcessHooks,
) -> int:
    """The router on `http_sock`, its workers through the configured launcher, the watchdog
    and the planner, until the HTTP server stops; then every worker is stopped."""
    import uvicorn

    from pdserve.router.app import build_app
    from pdserve.router.cluster import ClusterClient
    from pdserve.router.gateway.fast_http import fast_refusal_protocol
    from pdserve.router.heap import freeze_startup_objects
    from pdserve.router.metrics import RouterMetrics

    counts = config.worker_counts()
    client = ClusterClient(
        model_dir,
        f"tcp://{config.worker_host}:{config.router_port}",
        routing=config.routing(),
        model_name=config.model_name,
        max_model_len=config.engine.max_model_len,
        min_workers=sum(counts.values()) + config.external_workers,
        lease_s=config.worker_lease_s,
        migration=config.migration(),
        cluster_key=security.load_key_file(key_file) if key_file else None,
    )
    client.metrics = RouterMetrics(client.model_name)
    client.elastic.drain_timeout_s = config.role_switch_drain_s
    await client.start()
    app = build_app(client, client.metrics, gateway=config.gateway(), admin_key=config.admin_key)
    freeze_startup_objects()  # full collections stalled bursts for 0.1-0.8 s (router/heap.py)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            backlog=config.backlog,
            http=fast_refusal_protocol(app.edge),  # refusals answered below ASGI
        )
    )
    hooks.on_server(server)
    server_task = asyncio.create_task(server.serve(sockets=[http_sock]))
    workers = make_launcher(config, model_dir, client.router_addr, key_file)
    client.on_worker_expired = workers.kill  # fencing: a hung worker's process is killed
    client.launcher = workers  # scale in/out and role switches go through it
    try:
        workers.start(counts)
        if config.external_workers:
            print(
                f"waiting for {config.external_workers} worker(s): pdserve worker "
                f"--router {client.router_addr} {' '.join(_key_args(key_file))} --role ...",
                flush=True,
            )
        if not await _wait_ready(client, workers, server_task):
            return 0 if server.should_exit else 1  # a signal during start-up is a clean stop
        hooks.on_ready(f"model {client.model_name!r}, mode {config.mode}, workers {counts}")
        watchdog = asyncio.create_task(Watchdog(workers, client.mark_dead).run())
        planner = _start_planner(config, client)
        await server_task
        watchdog.cancel()
        if planner is not None:
            planner.cancel()
        return 0
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server_task, 5)
        await client.stop(shutdown_workers=list(workers.roles))  # not external ones
        workers.stop()


def cluster_key_file_of(config: ServeConfig) -> tuple[Path | None, security.TemporaryKey | None]:
    """The key file workers get (None: CURVE off), and the temporary key to remove at exit."""
    if config.insecure_no_curve:
        security.warn_insecure("pdserve serve")
        return None, None
    if config.cluster_key_file:
        path = Path(config.cluster_key_file)
        security.load_key_file(path)  # a bad file fails here, before any worker starts
        return path, None
    temp_key = security.TemporaryKey()
    return temp_key.path, temp_key


def _key_args(key_file: Path | None) -> list[str]:
    return ["--cluster-key", str(key_file)] if key_file else ["--insecure-no-curve"]


async def _wait_ready(client, workers, server_task: asyncio.Task) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if client.readiness().is_ready:
            return True
        failed = workers.failed()
        if failed:
            print(
                f"error: worker {failed} exited during start-up (see its log above)",
                file=sys.stderr,
            )
            return False
        if server_task.done():
            return False
        await asyncio.sleep(0.1)
    pending = sorted(workers.pending())  # Ray: no node has room for these
    hint = f"; no node has room for {', '.join(pending)}" if pending else ""
    print(
        f"error: workers not ready after {READY_TIMEOUT_S:.0f} s: "
        f"{client.readiness().reason}{hint}",
        file=sys.stderr,
    )
    return False


def _start_planner(config: ServeConfig, client) -> asyncio.Task | None:
    """The SLO planner beside the router (control/planner.py), if configured."""
    planner_config = config.planner_config()
    if planner_config is None:
        return None
    from pdserve.sim.rates import SimRates  # the simulator, only when a planner runs

    log = RequestLog()
    client.request_log = log
    rates = SimRates(
        config.planner_profile,
        config.threads(),
        config.engine,
        cache_path=config.planner_rates_cache,
    )
    client.planner = PlannerLoop(
        planner_config,
        log,
        rates,
        roles=lambda: {w: h.role for w, h in client.pool.workers.items() if h.is_alive},
        switch=client.elastic.switch_role,
        on_decision=client.metrics.observe_planner,
    )
    logger.info("planner: slo (TTFT %g ms, TPOT %g ms)", config.slo_ttft_ms, config.slo_tpot_ms)
    return asyncio.create_task(client.planner.run())


def make_launcher(config: ServeConfig, model_dir: Path, router_addr: str, key_file: Path | None):
    """The launcher `config.launcher` names: local child processes, or Ray actors."""
    if config.launcher == "local":
        return WorkerProcesses(config, model_dir, router_addr, key_file)
    from pdserve.control.ray_launcher import RayLauncher, driver_node_ip

    loopback = is_loopback(config.worker_host)
    host, _, port = router_addr.rpartition(":")
    if not loopback and host.endswith(("0.0.0.0", "[::]", "*")):
        router_addr = f"tcp://{driver_node_ip()}:{port}"  # what other nodes can reach
    specs = WorkerSpecs(config, model_dir, router_addr, key_file)
    return RayLauncher(
        specs.spec,
        lambda role: specs.engine(role).num_threads,
        config.ray_resources(),
        key_file,
        log_level=config.log_level,
        bind_loopback=loopback,
        builtin_model=config.model is None,
    )


class WorkerSpecs:
    """Each worker's `WorkerSpec` from one `ServeConfig`, for either launcher."""

    def __init__(
        self, config: ServeConfig, model_dir: Path, router_addr: str, key_file: Path | None
    ) -> None:
        self.config = config
        self.key_file = key_file  # the path only: the key never enters argv or env
        self.model_dir = model_dir
        self.router_addr = router_addr

    def engine(self, role: str) -> EngineConfig:
        engine = self.config.engine_for(role)
        if engine.num_threads is None:
            engine = dataclasses.replace(engine, num_threads=self.config.threads())
        return engine

    def spec(self, role: str, worker_id: str) -> WorkerSpec:
        c = self.config
        return WorkerSpec(
            worker_id=worker_id,
            role=role,
            model_dir=str(self.model_dir),
            router_addr=self.router_addr,
            engine=self.engine(role),
            host=c.worker_host,
            backends=("shm", "tcp") if c.kv_backend == "auto" else (c.kv_backend,),
            kv_layerwise=c.kv_layerwise,
            cluster_key_file=str(self.key_file) if self.key_file else None,
            kv_transport_security=c.kv_transport_security,
        )


class WorkerProcesses(LocalLauncher):
    """The worker child processes of one `pdserve serve`.

    Each child gets `pdserve worker --spec FILE`: its `WorkerSpec`, written (0600) into a
    private folder this launcher owns and removes at `stop`. The spec is rewritten at every
    (re)start from the worker's current role, so a worker restarted after a role switch
    (`set_role`) runs with the new role's engine settings.
    """

    def __init__(
        self, config: ServeConfig, model_dir: Path, router_addr: str, key_file: Path | None
    ) -> None:
        super().__init__(self._command, self._environment)
        self.config = config
        self.specs_of = WorkerSpecs(config, model_dir, router_addr, key_file)
        self.specs = SpecFolder()

    def engine(self, role: str) -> EngineConfig:
        return self.specs_of.engine(role)

    def spec(self, role: str, worker_id: str) -> WorkerSpec:
        return self.specs_of.spec(role, worker_id)

    def _environment(self, role: str) -> dict[str, str]:
        return dict(os.environ, OMP_NUM_THREADS=str(self.engine(role).num_threads))

    def _command(self, role: str, worker_id: str) -> list[str]:
        path = self.specs.write(self.spec(role, worker_id))
        return python_module_command(
            "--log-level", self.config.log_level, "worker", "--spec", str(path)
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        try:
            super().stop(timeout_s)
        finally:
            self.specs.remove()
