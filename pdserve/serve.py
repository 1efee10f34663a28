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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.config import EngineConfig
from pdserve.control.launcher import LocalLauncher, Watchdog, python_module_command
from pdserve.control.membership import DEFAULT_LEASE_S
from pdserve.control.migration import MigrationConfig
from pdserve.control.planner import PlannerConfig, RequestLog
from pdserve.control.planner_loop import PlannerLoop
from pdserve.control.ray_config import RoleResources, is_loopback, parse_worker_resources
from pdserve.control.slo_classes import parse_classes
from pdserve.control.worker_spec import SECRET_ENGINE_FIELDS, SpecFolder, WorkerSpec
from pdserve.errors import ConfigError, PdserveError
from pdserve.ipc import security
from pdserve.router.gateway.config import GatewayConfig
from pdserve.router.policy import RoutingConfig

logger = logging.getLogger("pdserve.serve")

READY_TIMEOUT_S = 300.0
ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # HF folder; None: the built-in model
    model_name: str | None = None  # served name; default: the folder name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_key: str | None = None  # for /admin/* (or PDSERVE_ADMIN_KEY); None: admin off
    mode: str = "auto"  # aggregated | disaggregated | auto
    prefill_workers: int | None = None  # default: 1 (0 in aggregated mode)
    decode_workers: int | None = None  # default: 1 (0 in aggregated mode)
    mixed_workers: int | None = None  # default: 1 in aggregated mode, else 0
    threads_per_worker: int | None = None  # default: cores split evenly
    worker_host: str = "127.0.0.1"  # interface workers and the router's worker socket bind
    router_port: int = 0  # the socket workers report to; 0: any free port
    kv_backend: str = "auto"  # auto | shm | tcp
    kv_wire_dtype: str = "auto"  # auto | int8 (tcp transfers only; see kv/int8.py)
    kv_layerwise: bool = True
    auto_local_prefill_tokens: int = 256
    auto_max_prefill_queue_tokens: int = 8192
    kv_transfer_timeout_s: float = 60.0
    # Which worker of a pool: kv_aware | least_loaded | round_robin (router/selection.py).
    routing_policy: str = "kv_aware"
    kv_aware_prefill_weight: float = 1.0
    kv_aware_queue_weight: float = 1.0
    kv_aware_running_weight: float = 16.0
    kv_aware_usage_weight: float = 512.0
    kv_aware_load_margin: float = 4096.0
    # Fault tolerance (control/): a worker silent or stalled this long is dead; a request
    # moves at most `max_migrations` times, waiting up to `migration_wait_s` for a worker.
    worker_lease_s: float = DEFAULT_LEASE_S
    max_migrations: int = 3
    migration_wait_s: float = 30.0
    log_level: str = "INFO"
    # Workers started elsewhere (`pdserve worker --router ...`) that readiness waits for,
    # on top of the ones this command launches.
    external_workers: int = 0
    # The control plane's CURVE key (ipc/security.py): a file from `pdserve keys`, or None
    # for a fresh key made at start and handed to the children this command launches.
    cluster_key_file: str | None = None
    insecure_no_curve: bool = False  # plain ZeroMQ: for debugging only, logged loudly
    # KV messages between workers (tcp backend): "encrypt" (CURVE, like every channel) or
    # "mac" (plain ZeroMQ, each message authenticated: integrity, not secrecy)
    kv_transport_security: str = "encrypt"
    # Elastic P/D (control/planner.py): "slo" moves workers between roles to follow the
    # load, with the SLOs and a `pdserve profile` cost model; "none" keeps the layout.
    planner: str = "none"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    planner_profile: str | None = None
    planner_rates_cache: str | None = None  # JSON file of simulated rates kept across runs
    planner_interval_s: float = 10.0
    planner_cooldown_s: float = 60.0
    # YAML only: {class: {ttft_ms, tpot_ms}}; a request's `slo_class` picks one (else the
    # SLO above). See control/planner.py `parse_classes`.
    slo_classes: dict = field(default_factory=dict)
    # The HTTP edge (router/gateway/; every field documented in GatewayConfig).
    api_keys: str | None = None  # YAML keys file with quotas
    protect_probes: bool = False
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 128
    max_prompts: int = 64
    max_stop: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 64
    max_prompt_bytes: int | None = None
    admission_ttft_ms: float | None = None
    admission_prefill_tokens_per_s: float = 2000.0
    max_queued_requests: int | None = None
    request_timeout_s: float | None = None
    limit_concurrency: int | None = None  # generation requests in flight; past it 503
    backlog: int = 2048  # uvicorn: pending TCP connections
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Per-role overrides merged over `engine` (partial mappings; `engine_for`).
    engine_prefill: dict[str, Any] = field(default_factory=dict)
    engine_decode: dict[str, Any] = field(default_factory=dict)
    engine_mixed: dict[str, Any] = field(default_factory=dict)
    # Where workers run (control/launcher.py): "local" child processes, or "ray" actors on
    # the Ray cluster at `ray_address`, with per-role `worker_resources` (control/ray_config.py).
    launcher: str = "local"
    ray_address: str | None = None  # None: RAY_ADDRESS, or a new Ray on this machine
    worker_resources: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role in ROLES:
            self.engine_for(role)  # validates the overrides
        self.routing()  # validates the routing fields
        self.gateway()  # validates the gateway fields
        if self.kv_transport_security not in security.KV_SECURITY_MODES:
            modes = " | ".join(security.KV_SECURITY_MODES)
            raise ConfigError("kv_transport_security", f"must be {modes}")
        counts = self.worker_counts()
        if sum(counts.values()) + self.external_workers == 0:
            raise ConfigError("workers", "no workers configured")
        if any(n < 0 for n in counts.values()):
            raise ConfigError("workers", f"negative worker count in {counts}")
        if not 0 < self.port < 65536:
            raise ConfigError("port", f"{self.port} is not a TCP port")
        if self.worker_lease_s <= 0:
            raise ConfigError("worker_lease_s", "must be > 0")
        if self.admin_key == "":  # api_key: the gateway config checks it
            raise ConfigError("admin_key", "is empty; omit it to keep the admin API closed")
        self.migration()  # validates the migration fields
        self.planner_config()  # validates the planner fields
        self.ray_resources()  # validates the launcher fields

    def ray_resources(self) -> dict[str, RoleResources]:
        if self.launcher not in ("local", "ray"):
            raise ConfigError("launcher", f"{self.launcher!r}; choose 'local' or 'ray'")
        return parse_worker_resources(self.worker_resources)

    def planner_config(self) -> PlannerConfig | None:
        if self.planner not in ("none", "slo"):
            raise ConfigError("planner", f"{self.planner!r}; choose 'none' or 'slo'")
        if self.planner == "none":
            if self.slo_classes:
                raise ConfigError("slo_classes", "are for the SLO planner: set planner: slo")
            return None
        for name in ("slo_ttft_ms", "slo_tpot_ms", "planner_profile"):
            if getattr(self, name) is None:
                hint = " (make one with: pdserve profile --out profile.json)"
                raise ConfigError(
                    name, "required by planner: slo" + (hint if "profile" in name else "")
                )
        if not Path(self.planner_profile).is_file():
            raise ConfigError("planner_profile", f"{self.planner_profile} does not exist")
        return PlannerConfig(
            self.slo_ttft_ms,
            self.slo_tpot_ms,
            interval_s=self.planner_interval_s,
            cooldown_s=self.planner_cooldown_s,
            classes=parse_classes(self.slo_classes),
        )

    def migration(self) -> MigrationConfig:
        return MigrationConfig(self.max_migrations, self.migration_wait_s)

    def worker_counts(self) -> dict[str, int]:
        aggregated = self.mode == "aggregated"
        return {
            "prefill": _or(self.prefill_workers, 0 if aggregated else 1),
            "decode": _or(self.decode_workers, 0 if aggregated else 1),
            "mixed": _or(self.mixed_workers, 1 if aggregated else 0),
        }

    def routing(self) -> RoutingConfig:
        return RoutingConfig(
            mode=self.mode,
            auto_local_prefill_tokens=self.auto_local_prefill_tokens,
            auto_max_prefill_queue_tokens=self.auto_max_prefill_queue_tokens,
            kv_backend=self.kv_backend,
            kv_wire_dtype=self.kv_wire_dtype,
            kv_transfer_timeout_s=self.kv_transfer_timeout_s,
            routing_policy=self.routing_policy,
            kv_aware_prefill_weight=self.kv_aware_prefill_weight,
            kv_aware_queue_weight=self.kv_aware_queue_weight,
            kv_aware_running_weight=self.kv_aware_running_weight,
            kv_aware_usage_weight=self.kv_aware_usage_weight,
            kv_aware_load_margin=self.kv_aware_load_margin,
        )

    def gateway(self) -> GatewayConfig:
        names = [f.name for f in dataclasses.fields(GatewayConfig) if f.name != "api_keys_file"]
        return GatewayConfig(**{n: getattr(self, n) for n in names}, api_keys_file=self.api_keys)

    def engine_for(self, role: str) -> EngineConfig:
        """The engine settings of a `role` worker: `engine` with that role's overrides."""
        overrides = getattr(self, f"engine_{role}")
        _check_engine_keys(overrides, f"engine_{role}")
        try:
            return dataclasses.replace(self.engine, **overrides)
        except ConfigError as e:
            raise ConfigError(f"engine_{role}.{e.field}", str(e).split(": ", 1)[-1]) from None

    def threads(self) -> int:
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        num_workers = sum(self.worker_counts().values())
        return max(1, (os.cpu_count() or 1) // num_workers)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting; known: {sorted(known)}")
        data = dict(data)
        sections = {}
        for name in ("engine", *(f"engine_{role}" for role in ROLES)):
            section = data.pop(name, None) or {}
            _check_engine_keys(section, name)
            _check_types(EngineConfig, section, f"{name}.")
            sections[name] = dict(section)
        _check_types(cls, data, "")
        engine = EngineConfig(**sections.pop("engine"))
        return cls(**data, **sections, engine=engine)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        data: dict[str, Any] = {}
        if args.config:
            data = _read_yaml(Path(args.config))
        engine = data.get("engine") or {}
        if not isinstance(engine, dict):
            raise ConfigError("engine", "must be a mapping of engine settings")
        engine = dict(engine)
        for name in [*SERVE_FLAGS, *SECURITY_FLAGS, "kv_layerwise", "protect_probes"]:
            value = getattr(args, name)
            if value is not None:
                data[name] = value
        if args.serve_log_level:
            data["log_level"] = args.serve_log_level
        for name in [*ENGINE_FLAGS, "batch_invariant"]:
            value = getattr(args, f"engine_{name}")
            if value is not None:
                engine[name] = value
                for role in ROLES:  # a flag sets the value for every role
                    overrides = data.get(f"engine_{role}")
                    if isinstance(overrides, dict):
                        data[f"engine_{role}"] = {k: v for k, v in overrides.items() if k != name}
        if args.api_key is None and os.environ.get("PDSERVE_API_KEY"):
            data["api_key"] = os.environ["PDSERVE_API_KEY"]
        if args.admin_key is None and os.environ.get("PDSERVE_ADMIN_KEY"):
            data["admin_key"] = os.environ["PDSERVE_ADMIN_KEY"]
        data["engine"] = engine
        return cls.from_dict(data)


def _check_engine_keys(section: Any, name: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(name, "must be a mapping of engine settings")
    known = {f.name for f in dataclasses.fields(EngineConfig)} - SECRET_ENGINE_FIELDS
    bad = sorted(set(section) - known)
    if bad:
        raise ConfigError(f"{name}.{bad[0]}", f"unknown; known: {sorted(known)}")


def _check_types(cls: type, data: dict[str, Any], prefix: str) -> None:
    """YAML gives any type: reject a value that is not what the field holds."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        allowed = typing.get_args(hints[name]) or (hints[name],)
        allowed = tuple(type(None) if a is None else a for a in allowed)
        if float in allowed:
            allowed += (int,)
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok and name != "engine":
            names = " or ".join(a.__name__ for a in allowed)
            raise ConfigError(prefix + name, f"expected {names}, got {value!r}")


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError("config", f"{path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of settings")
    return data


# Flags mirror ServeConfig / EngineConfig fields; None means "not given" so YAML wins.
SERVE_FLAGS = {
    "model": (str, "HF model folder (default: the built-in model)"),
    "model_name": (str, "model name clients send (default: the folder name)"),
    "host": (str, "HTTP interface (default 127.0.0.1)"),
    "port": (int, "HTTP port (default 8000)"),
    "api_key": (str, "require this bearer key on /v1 (or set PDSERVE_API_KEY)"),
    "admin_key": (str, "bearer key for /admin/* (or set PDSERVE_ADMIN_KEY; default: off)"),
    "mode": (str, "aggregated | disaggregated | auto (default auto)"),
    "prefill_workers": (int, "prefill workers (default 1)"),
    "decode_workers": (int, "decode workers (default 1)"),
    "mixed_workers": (int, "mixed workers (default 0; 1 in aggregated mode)"),
    "threads_per_worker": (int, "CPU threads per worker (default: cores / workers)"),
    "worker_host": (str, "interface for internal sockets (default 127.0.0.1)"),
    "router_port": (int, "port workers report to (default: any free port)"),
    "kv_backend": (str, "auto | shm | tcp | nixl (default auto; nixl needs pip install nixl)"),
    "kv_wire_dtype": (str, "auto | int8: int8 KV with per-block scales on tcp (default auto)"),
    "kv_transport_security": (
        str,
        "encrypt | mac: KV between workers CURVE-encrypted, or authenticated only (a MAC "
        "per message: for private networks; default encrypt)",
    ),
    "auto_local_prefill_tokens": (int, "auto mode: prompts shorter than this prefill locally"),
    "kv_transfer_timeout_s": (float, "seconds before a KV hand-over is abandoned"),
    "routing_policy": (str, "kv_aware | least_loaded | round_robin (default kv_aware)"),
    "worker_lease_s": (float, "a worker silent or stalled this long is dead (default 5)"),
    "launcher": (str, "local | ray: worker processes here, or Ray actors (default local)"),
    "ray_address": (str, "launcher ray: the Ray cluster, HOST:PORT (default: RAY_ADDRESS)"),
    "max_migrations": (int, "times a request may move to another worker (default 3)"),
    "migration_wait_s": (float, "wait this long for a worker to move a request to (30)"),
    "planner": (str, "none | slo: move workers between roles to follow the load"),
    "slo_ttft_ms": (float, "planner slo: time-to-first-token target"),
    "slo_tpot_ms": (float, "planner slo: time-per-output-token target"),
    "planner_profile": (str, "planner slo: cost model from `pdserve profile --out FILE`"),
    "planner_rates_cache": (str, "planner slo: JSON file keeping simulated rates across runs"),
    "planner_interval_s": (float, "planner slo: seconds between decisions (default 10)"),
    "planner_cooldown_s": (float, "planner slo: at least this long between switches (60)"),
    "kv_aware_prefill_weight": (float, "kv_aware: cost per uncached prompt token (default 1)"),
    "kv_aware_queue_weight": (float, "kv_aware: cost per queued prompt token (default 1)"),
    "kv_aware_running_weight": (float, "kv_aware: cost per assigned request (default 16)"),
    "kv_aware_usage_weight": (float, "kv_aware: cost of a full KV pool (default 512)"),
    "kv_aware_load_margin": (
        float,
        "kv_aware: tokens of load past the least-loaded worker beyond which a prefix hit "
        "no longer counts (default 4096)",
    ),
    "api_keys": (str, "YAML file of API keys with quotas (keys: [{name, key, ...}])"),
    "max_body_bytes": (int, "request bodies above this get 413 (default 4 MiB)"),
    "max_n": (int, "most samples per prompt (default 128)"),
    "max_prompts": (int, "most prompts in one completions request (default 64)"),
    "max_stop": (int, "most stop strings (default 16)"),
    "max_stop_chars": (int, "longest stop string (default 256)"),
    "max_stop_token_ids": (int, "most stop token ids (default 64)"),
    "max_prompt_bytes": (
        int,
        "prompt text bytes refused untokenised (default: context x longest token)",
    ),
    "admission_ttft_ms": (float, "429 at once when a request's predicted TTFT exceeds this"),
    "admission_prefill_tokens_per_s": (float, "admission's prefill rate until measured (2000)"),
    "max_queued_requests": (int, "429 past this many requests waiting for a first token"),
    "request_timeout_s": (float, "abort requests running longer (default: none)"),
    "limit_concurrency": (int, "most generation requests in flight; 503 past it"),
    "backlog": (int, "uvicorn: pending TCP connections (default 2048)"),
}
SECURITY_FLAGS = ("cluster_key_file", "insecure_no_curve")
ENGINE_FLAGS = {
    "dtype": str,
    "device": str,
    "max_model_len": int,
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "kv_cache_memory_gib": float,
    "num_kv_blocks": int,
    "block_size": int,
    "seed": int,
    "kv_host_cache_gib": float,
    "kv_disk_cache_dir": str,
    "kv_disk_cache_gib": float,
    "kv_redis_url": str,
    "kv_tier_dtype": str,
    "quantization": str,
    "kv_tier_admission": str,
    "kv_tier_admission_threshold": int,
}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of settings")
    # Its own dest: a subcommand's default would otherwise mask `pdserve --log-level`.
    parser.add_argument(
        "--log-level",
        dest="serve_log_level",
        default=None,
        help="DEBUG | INFO | WARNING (default INFO)",
    )
    for name, (kind, help_text) in SERVE_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    parser.add_argument(
        "--protect-probes",
        dest="protect_probes",
        action="store_const",
        const=True,
        default=None,
        help="require an API key on /metrics, /ready and /docs too",
    )
    parser.add_argument(
        "--cluster-key",
        dest="cluster_key_file",
        default=None,
        help="CURVE key file from `pdserve keys` (default: a fresh key for this run)",
    )
    parser.add_argument(
        "--insecure-no-curve",
        dest="insecure_no_curve",
        action="store_const",
        const=True,
        default=None,
        help="DEBUG ONLY: internal ZeroMQ sockets without CURVE authentication/encryption",
    )
    parser.add_argument(
        "--no-kv-layerwise",
        dest="kv_layerwise",
        action="store_const",
        const=False,
        default=None,
        help="send KV after the whole prefill",
    )
    group = parser.add_argument_group("engine (per worker)")
    for name, kind in ENGINE_FLAGS.items():
        group.add_argument(
            "--" + name.replace("_", "-"), dest=f"engine_{name}", type=kind, default=None
        )
    group.add_argument(
        "--batch-invariant",
        dest="engine_batch_invariant",
        action="store_const",
        const=True,
        default=None,
        help="logits of a row bitwise independent of its batch (CPU float32)",
    )


# ---- the launcher -------------------------------------------------------------------------


def run_serve(config: ServeConfig) -> int:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    from pdserve.model.builtin import ensure_builtin_model

    model_dir = Path(config.model) if config.model else ensure_builtin_model(progress=True)
    http_sock = _bind_http(config.host, config.port)
    try:
        if config.launcher == "ray":
            from pdserve.control.ray_launcher import connect

            connect(config.ray_address)
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            return runner.run(_serve(config, model_dir, http_sock))
    except PdserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConnectionError as e:  # ray.init: no cluster at ray_address
        print(f"error: cannot join the Ray cluster {config.ray_address!r}: {e}", file=sys.stderr)
        return 1


def _event_loop_factory():
    """uvloop's loop when installed (a dependency): it accepts and answers connections
    ~1.5-2x faster than asyncio's under a burst (docs/benchmarks.md, Overload)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _bind_http(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


async def _serve(config: ServeConfig, model_dir: Path, http_sock: socket.socket) -> int:
    key_file, temp_key = _cluster_key_file(config)
    try:
        return await _serve_with_key(config, model_dir, http_sock, key_file)
    finally:
        if temp_key is not None:
            temp_key.remove()


async def _serve_with_key(
    config: ServeConfig, model_dir: Path, http_sock: socket.socket, key_file: Path | None
) -> int:
    import uvicorn

    from pdserve.router.app import build_app
    from pdserve.router.cluster import ClusterClient
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
    await client.start()
    app = build_app(client, client.metrics, gateway=config.gateway(), admin_key=config.admin_key)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            backlog=config.backlog,
        )
    )

    # uvicorn handles SIGINT/SIGTERM while it serves and re-raises them afterwards; these
    # handlers receive that re-raise so shutdown continues below instead of dying mid-way.
    def on_signal(signum, frame) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        server.should_exit = True  # also covers a signal while workers are starting

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
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
        url = f"http://{config.host}:{config.port}"
        print(
            f"pdserve ready: {url}/v1 (model {client.model_name!r}, mode {config.mode}, "
            f"workers {counts})",
            flush=True,
        )
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


def _cluster_key_file(config: ServeConfig) -> tuple[Path | None, security.TemporaryKey | None]:
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
