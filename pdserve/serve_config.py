"""`pdserve serve`'s configuration: `ServeConfig` (every key of the YAML file and every
flag), how YAML and flags combine (flags override the file; engine settings under
`engine:`, per-role overrides under `engine_prefill:` / `engine_decode:` / `engine_mixed:`),
and its validation with errors naming the field. The flags themselves are in `serve_flags.py`.

Its own module, below both `serve.py` (which runs a configuration) and `sim/` (which
simulates one), so the simulator reads the very configuration `pdserve serve` would run
without importing the launcher.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.config import EngineConfig
from pdserve.control.membership import DEFAULT_LEASE_S
from pdserve.control.migration import MigrationConfig
from pdserve.control.planner import PlannerConfig
from pdserve.control.ray_config import (
    RoleResources,
    RouterResources,
    parse_router_resources,
    parse_worker_resources,
)
from pdserve.control.slo_classes import parse_classes
from pdserve.control.worker_spec import SECRET_ENGINE_FIELDS
from pdserve.errors import ConfigError
from pdserve.ipc import security
from pdserve.router.gateway.config import GatewayConfig
from pdserve.router.policy import RoutingConfig
from pdserve.serve_flags import ENGINE_FLAGS, SECURITY_FLAGS, SERVE_FLAGS

ROLES = ("prefill", "decode", "mixed")
NODE_IP = "node-ip"  # `host` under router_on_ray: the IP Ray knows the router's node by


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
    # A role switch lets the worker's running requests finish this long before the rest
    # migrate (router/elastic.py); 0 migrates them at once.
    role_switch_drain_s: float = 10.0
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
    backlog: int = 4096  # pending TCP connections (the kernel caps it at net.core.somaxconn)
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
    # The router (HTTP, control, launcher) in a Ray actor, this process its supervisor
    # (serve_ray.py); `router_resources` pins it (control/ray_config.py). Ray restarts a
    # dead router actor, with fresh workers, up to `router_max_restarts` times.
    router_on_ray: bool = False
    router_resources: dict = field(default_factory=dict)
    router_max_restarts: int = 3

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
        if not 0 <= self.role_switch_drain_s < float("inf"):
            raise ConfigError("role_switch_drain_s", "must be >= 0 seconds")
        if self.admin_key == "":  # api_key: the gateway config checks it
            raise ConfigError("admin_key", "is empty; omit it to keep the admin API closed")
        self.migration()  # validates the migration fields
        self.planner_config()  # validates the planner fields
        self.ray_resources()  # validates the launcher fields

    def ray_resources(self) -> dict[str, RoleResources]:
        if self.launcher not in ("local", "ray"):
            raise ConfigError("launcher", f"{self.launcher!r}; choose 'local' or 'ray'")
        self.router_placement()
        return parse_worker_resources(self.worker_resources)

    def router_placement(self) -> RouterResources:
        """The router actor's resources; checks the router-on-Ray settings fit together."""
        if self.router_on_ray and self.launcher != "ray":
            raise ConfigError("router_on_ray", "needs launcher: ray (--launcher ray)")
        if self.router_resources and not self.router_on_ray:
            raise ConfigError("router_resources", "place the router actor: set router_on_ray")
        if self.host == NODE_IP and not self.router_on_ray:
            raise ConfigError("host", f"{NODE_IP!r} means the router actor's node: router_on_ray")
        if self.router_max_restarts < 0:
            raise ConfigError("router_max_restarts", "must be >= 0")
        return parse_router_resources(self.router_resources)

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
            local_prefill=self.mode == "auto",
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
        for name in [
            *SERVE_FLAGS,
            *SECURITY_FLAGS,
            "kv_layerwise",
            "protect_probes",
            "router_on_ray",
        ]:
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
