"""Workload classes with SLOs of their own, for the SLO planner (control/planner.py).

A serve YAML names classes — `slo_classes: {long: {ttft_ms: 5000, tpot_ms: 50}}` — and a
request picks one with the `slo_class` body field (router/protocol.py checks its shape:
`CLASS_PATTERN`); requests of no class, or of a class the server does not know, are
planned under the default SLO (`slo_ttft_ms` / `slo_tpot_ms`). `parse_classes` reads the
YAML, `class_rates` rates a forecast whose mix holds several classes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pdserve.control.planner import (
    DEFAULT_CLASS,
    ROLES,
    Forecast,
    PlannerConfig,
    RateModel,
    RoleRates,
)
from pdserve.errors import ConfigError

CLASS_PATTERN = r"[\w.-]{1,64}"  # what a request's `slo_class` may be (router/protocol.py)


def parse_classes(data: Any) -> tuple[tuple[str, float, float], ...]:
    """`slo_classes` of a serve YAML — `{long: {ttft_ms: 5000, tpot_ms: 50}, ...}` — as
    `PlannerConfig.classes`; errors name the class and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError("slo_classes", f"expected a mapping of class names, got {data!r}")
    classes = []
    for name, slo in data.items():
        where = f"slo_classes.{name}"
        if not isinstance(name, str) or not re.fullmatch(CLASS_PATTERN, name):
            raise ConfigError(where, "a class name is 1-64 letters, digits, '_', '.', '-'")
        if name == DEFAULT_CLASS:
            raise ConfigError(where, "is the default class: set slo_ttft_ms / slo_tpot_ms")
        if not isinstance(slo, Mapping) or set(slo) != {"ttft_ms", "tpot_ms"}:
            raise ConfigError(where, f"expected {{ttft_ms, tpot_ms}}, got {slo!r}")
        for key in ("ttft_ms", "tpot_ms"):
            value = slo[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{where}.{key}", f"must be a number > 0, got {value!r}")
        classes.append((name, float(slo["ttft_ms"]), float(slo["tpot_ms"])))
    return tuple(classes)


def class_rates(model: RateModel, fc: Forecast, config: PlannerConfig) -> RoleRates:
    """One worker's goodput per role for a mix of SLO classes: each class's rates under its
    own SLO (`model` on that class's requests), blended by its share of the mix the way a
    worker time-shares them — per role, 1 / sum(share_c / rate_c). One class (or none
    configured): `model` on the whole forecast, unchanged."""
    names = sorted(set(fc.classes)) if fc.classes else [DEFAULT_CLASS]
    if len(names) == 1:
        return model(fc, config.for_class(names[0]))
    shares, per_class = [], []
    for name in names:
        mix = tuple(m for m, c in zip(fc.mix, fc.classes, strict=True) if c == name)
        shares.append(len(mix) / len(fc.mix))
        sub = Forecast(fc.rate * shares[-1], mix, (name,) * len(mix))
        per_class.append(model(sub, config.for_class(name)))

    def blend(field: str) -> float | None:
        rates = [getattr(r, field) for r in per_class]
        if any(rate is None for rate in rates):
            return None  # the busy rates, when some class has none
        if min(rates) <= 0:
            return 0.0
        return 1.0 / sum(share / rate for share, rate in zip(shares, rates, strict=True))

    alone = [blend(role) for role in ROLES]
    busy = [blend(role + "_busy") for role in ROLES]
    return RoleRates(*alone, *busy)  # type: ignore[arg-type]
