"""What the Ray launcher asks Ray for, per role: resources, node labels and placement.

YAML (`pdserve serve --config`), beside `launcher: ray` and `ray_address`:

    worker_resources:
      prefill: {num_cpus: 2, resources: {prefill_node: 1}, placement: spread}
      decode:  {num_cpus: 2, num_gpus: 1, label_selector: {zone: a}, placement: pack}

Per role, every key optional:
- `num_cpus` (default: the worker's thread count), `num_gpus` (default 0), `resources`
  (custom Ray resources, e.g. one a node was started with: `ray start --resources`);
- `label_selector`: node labels the worker's node must carry (`ray start --labels`);
- `placement`: `default` (Ray picks any node with the resources), `spread` (workers of this
  role on different nodes where possible: Ray's SPREAD strategy) or `pack` (worker *i* of
  this role shares one STRICT_PACK placement group with worker *i* of every other `pack`
  role, so a prefill/decode pair lands on one node and its KV goes over shared memory).

With `router_on_ray: true` the router itself runs in a Ray actor (serve_ray.py), placed by

    router_resources: {num_cpus: 1, resources: {head_node: 1}, label_selector: {pool: edge}}

(every key optional; `num_cpus` defaults to 1: the router tokenises and serves HTTP).

Validated once, at load: a bad key or value raises `ConfigError` naming it (for example
`worker_resources.decode.num_gpus`). Neither Ray nor torch is imported here, so a config
check stays fast and works without Ray installed.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.errors import ConfigError

ROLES = ("prefill", "decode", "mixed")
PLACEMENTS = ("default", "spread", "pack")


class RoleResources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    num_cpus: float | None = None  # None: the worker's thread count
    num_gpus: float = 0.0
    resources: dict[str, float] = msgspec.field(default_factory=dict)
    label_selector: dict[str, str] = msgspec.field(default_factory=dict)
    placement: str = "default"

    def bundle(self, num_threads: int) -> dict[str, float]:
        """This role's resources as one placement-group bundle (Ray's names)."""
        bundle = {"CPU": self.cpus(num_threads), **self.resources}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        return bundle

    def cpus(self, num_threads: int) -> float:
        return float(num_threads) if self.num_cpus is None else self.num_cpus


def parse_worker_resources(data: Any) -> dict[str, RoleResources]:
    """`worker_resources` from YAML: every role present, defaults for those not given."""
    if not isinstance(data, dict):
        raise ConfigError("worker_resources", "must be a mapping of role -> resources")
    unknown = sorted(set(data) - set(ROLES))
    if unknown:
        raise ConfigError(f"worker_resources.{unknown[0]}", f"unknown role; roles: {ROLES}")
    return {role: _role(data.get(role) or {}, f"worker_resources.{role}") for role in ROLES}


def _role(data: Any, name: str) -> RoleResources:
    if not isinstance(data, dict):
        raise ConfigError(name, "must be a mapping (num_cpus, num_gpus, resources, ...)")
    try:
        parsed = msgspec.convert(data, RoleResources)
    except msgspec.ValidationError as e:
        raise ConfigError(*_field_error(name, e)) from None
    if parsed.placement not in PLACEMENTS:
        raise ConfigError(f"{name}.placement", f"{parsed.placement!r}; choose one of {PLACEMENTS}")
    amounts = {"num_gpus": parsed.num_gpus, **parsed.resources}
    if parsed.num_cpus is not None:
        amounts["num_cpus"] = parsed.num_cpus
    for key, amount in amounts.items():
        if amount < 0:
            raise ConfigError(f"{name}.{key}", f"must be >= 0, got {amount}")
    return parsed


class RouterResources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the router actor may run (`router_resources`)."""

    num_cpus: float = 1.0
    resources: dict[str, float] = msgspec.field(default_factory=dict)
    label_selector: dict[str, str] = msgspec.field(default_factory=dict)


def parse_router_resources(data: Any) -> RouterResources:
    if not isinstance(data, dict):
        raise ConfigError("router_resources", "must be a mapping (num_cpus, resources, ...)")
    try:
        parsed = msgspec.convert(data, RouterResources)
    except msgspec.ValidationError as e:
        raise ConfigError(*_field_error("router_resources", e)) from None
    for key, amount in {"num_cpus": parsed.num_cpus, **parsed.resources}.items():
        if amount < 0:
            raise ConfigError(f"router_resources.{key}", f"must be >= 0, got {amount}")
    return parsed


def _field_error(name: str, error: msgspec.ValidationError) -> tuple[str, str]:
    """(field, message) of a msgspec error, the field named from `name` down."""
    where = str(error).rsplit("at `$", 1)
    field = where[1].rstrip("`").lstrip(".") if len(where) == 2 else ""
    return f"{name}.{field}".rstrip("."), where[0].strip(" -")


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
