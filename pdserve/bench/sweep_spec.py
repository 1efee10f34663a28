"""The sweep YAML, validated: `SweepSpec.load(path)` or `SweepSpec.from_dict(data)`.

The schema is documented in `bench/sweep.py` (and `docs/bench.md`, "Sweeps"). Every
check runs here, before any server starts: an hour into a sweep is a bad time to learn
that the fourth configuration has a typo. A bad value raises `ConfigError` naming its
place in the YAML — `configurations[1].engine.max_num_seqs`, `workloads[0].slo.ttft_ms`,
`search.attainment` — and server settings are checked by `ServeConfig.from_dict`, the
same code `pdserve serve --config` runs, so a sweep accepts exactly what the server does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.phases import Phase, parse_phases
from pdserve.bench.types import SLO
from pdserve.config import EngineConfig
from pdserve.errors import ConfigError
from pdserve.serve_config import ServeConfig

TOP_LEVEL_KEYS = ("configurations", "workloads", "phases", "search")
CHOSEN_BY_SWEEP = ("port", "router_port")  # each server gets free ports
DEFAULT_WORKLOADS = ("chat",)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    name: str
    slo: SLO | None = None  # None: the workload's default SLO


@dataclass(frozen=True, slots=True)
class SearchSettings:
    attainment: float = 0.9
    num_requests: int = 50  # per probe, at least
    min_duration_s: float = 0.0  # and at least rate x this many (a steady state, not a burst)
    max_probes: int = 6
    start_rate: float = 1.0
    rel_tol: float = 0.1
    cores: int | None = None  # cores of the machine; None: this machine's
    price_per_hour: float | None = None
    ignore_eos: bool = True
    ready_timeout_s: float = 300.0
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> SearchSettings:
        data = _mapping("search", data)
        _check_types(cls, data, "search.")
        settings = cls(**data)
        positive = ("num_requests", "max_probes", "start_rate", "rel_tol", "ready_timeout_s")
        for name in positive:
            if getattr(settings, name) <= 0:
                raise ConfigError(f"search.{name}", f"must be > 0, got {getattr(settings, name)}")
        if settings.min_duration_s < 0:
            raise ConfigError(
                "search.min_duration_s", f"must be >= 0, got {settings.min_duration_s}"
            )
        if not 0 < settings.attainment <= 1:
            raise ConfigError("search.attainment", f"must be in (0, 1], got {settings.attainment}")
        if settings.cores is not None and settings.cores < 1:
            raise ConfigError("search.cores", f"must be >= 1, got {settings.cores}")
        return settings


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    settings: dict[str, Any]  # the YAML mapping without `name`: what the server is given
    config: ServeConfig  # the same, validated


@dataclass(frozen=True, slots=True)
class SweepSpec:
    configurations: tuple[ServerSpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    search: SearchSettings
    # Instead of `workloads`: one phase-shifting trace sent to every configuration
    # (bench/phases.py; bench/sweep_phases.py runs it), ranked by whole-trace goodput.
    phases: tuple[Phase, ...] = ()

    @classmethod
    def load(cls, path: Path) -> SweepSpec:
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("sweep", f"{path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError("sweep", f"{path} is not valid YAML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> SweepSpec:
        data = _mapping("sweep", data)
        unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown sweep key; known: {list(TOP_LEVEL_KEYS)}")
        configurations = _list("configurations", data.get("configurations"))
        if not configurations:
            raise ConfigError("configurations", "list at least one server configuration")
        servers = tuple(_server(i, c) for i, c in enumerate(configurations))
        _check_unique("configurations", [s.name for s in servers])
        settings = SearchSettings.from_dict(data.get("search") or {})
        if "phases" in data:
            if "workloads" in data:
                raise ConfigError("phases", "a sweep has workloads or phases, not both")
            return cls(servers, (), settings, parse_phases(data["phases"]))
        workloads = tuple(
            _workload(i, w)
            for i, w in enumerate(_list("workloads", data.get("workloads", DEFAULT_WORKLOADS)))
        )
        if not workloads:
            raise ConfigError("workloads", "list at least one workload")
        _check_unique("workloads", [w.name for w in workloads])
        return cls(servers, workloads, settings)

    def workload_names(self) -> list[str]:
        return [w.name for w in self.workloads]

    def num_cores(self, server: ServerSpec) -> int:
        """The cores a configuration can use: workers × threads, at most the machine's."""
        machine = self.search.cores or os.cpu_count() or 1
        used = sum(server.config.worker_counts().values()) * server.config.threads()
        return max(1, min(machine, used))


def _server(index: int, item: Any) -> ServerSpec:
    where = f"configurations[{index}]"
    settings = dict(_mapping(where, item))
    name = settings.pop("name", None)
    for key in CHOSEN_BY_SWEEP:
        if key in settings:
            raise ConfigError(f"{where}.{key}", "is chosen by the sweep (a free port); remove it")
    try:
        config = ServeConfig.from_dict(settings)
    except ConfigError as e:
        message = str(e).removeprefix(f"{e.field}: ")
        raise ConfigError(f"{where}.{_serve_field(e.field)}", message) from None
    except (TypeError, ValueError) as e:  # a validator of a nested config
        raise ConfigError(where, str(e)) from None
    if name is None:
        name = f"{index}-{config.mode}"
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"{where}.name", f"use letters, digits, '.', '-', '_'; got {name!r}")
    return ServerSpec(name, settings, config)


def _serve_field(name: str) -> str:
    """EngineConfig's own checks name its field bare; in the YAML it sits under engine."""
    serve_fields = {f.name for f in dataclasses.fields(ServeConfig)}
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    return f"engine.{name}" if name in engine_fields - serve_fields else name


def _workload(index: int, item: Any) -> WorkloadSpec:
    where = f"workloads[{index}]"
    if isinstance(item, str):
        item = {"name": item}
    item = _mapping(where, item)
    unknown = sorted(set(item) - {"name", "slo"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown; known: ['name', 'slo']")
    name = item.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name", f"expected a workload name, got {name!r}")
    _check_workload_exists(f"{where}.name", name)
    slo = None
    if item.get("slo") is not None:
        slo_data = _mapping(f"{where}.slo", item["slo"])
        _check_types(SLO, slo_data, f"{where}.slo.")
        for key in ("ttft_ms", "tpot_ms"):
            if key not in slo_data:
                raise ConfigError(f"{where}.slo.{key}", "missing: give both ttft_ms and tpot_ms")
            if slo_data[key] <= 0:
                raise ConfigError(f"{where}.slo.{key}", f"must be > 0, got {slo_data[key]}")
        slo = SLO(**slo_data)
    return WorkloadSpec(name, slo)


def _check_workload_exists(where: str, name: str) -> None:
    from pdserve.bench.workloads import get_workload

    try:
        get_workload(name)
    except ConfigError as e:
        raise ConfigError(where, str(e).removeprefix(f"{e.field}: ")) from None


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"expected a mapping, got {value!r}")
    return value


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(where, f"expected a list, got {value!r}")
    return list(value)


def _check_unique(where: str, names: list[str]) -> None:
    seen = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"{where}[{i}].name", f"{name!r} appears twice")
        seen.add(name)


def _check_types(cls: type, data: Mapping[str, Any], prefix: str) -> None:
    """Unknown keys and values of the wrong type (YAML gives any type) name the field."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(prefix + name, f"unknown; known: {known}")
        allowed = typing.get_args(hints[name]) or (hints[name],)
        allowed = tuple(type(None) if a is None else a for a in allowed)
        if float in allowed:
            allowed += (int,)
        is_bool = isinstance(value, bool)
        if not isinstance(value, allowed) or (is_bool and bool not in allowed):
            names = " or ".join(a.__name__ for a in allowed)
            raise ConfigError(prefix + name, f"expected {names}, got {value!r}")
