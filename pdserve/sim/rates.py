"""`SimRates`: the SLO planner's rate model (control/planner.py `RateModel`) from the
simulator — one worker's goodput per role for the forecast's length mix, by
`sim/search.py`'s `phase_rates` on a `pdserve profile` cost model, cached by the mix's
coarse signature and the SLO.

Each simulated request gets a prompt of its own (a distinct first token): identical
prompts would hit the simulated prefix cache and make prefill look almost free (the
first version sent `[1] * n` for every request and measured ~57 prompts/s of 1024
tokens per worker, ~30x the profile's prefill speed).

On a CPU host (the workers share its cores) each role is rated twice: alone, and beside
a neighbour that steps all along (`busy_workers=1`, sim/sharing.py: its share of the
cores and the profile's measured memory-bandwidth `contention`), the planner's
contention term (`RoleRates.*_busy`, control/planner.py `Layout.capacity`).

A cache miss costs tens of seconds to minutes of pure-Python simulation. The planner
calls the model off the event loop, but a thread still shares the router's GIL, so the
simulation runs in a child process (spawned, at `nice` +10 below the workers) and the
router's streams do not stall while it runs. With `cache_path` (the serve setting
`planner_rates_cache`) the rates are kept in a JSON file, reused after a restart, and can
be computed ahead of time for the mixes a deployment expects.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.control.planner import Forecast, PlannerConfig, RoleRates

MAX_REQUESTS = 400  # per simulated probe
DEFAULT_MIX = ((256, 128),)
MEASURE_TIMEOUT_S = 900.0
CHILD_NICENESS = 10


@dataclass
class SimRates:
    """One worker's goodput per role for a forecast's mix (module docstring)."""

    profile_path: str
    threads_per_worker: int = 1
    engine: object = None  # EngineConfig of the workers (defaults)
    in_subprocess: bool = True
    cache_path: str | None = None  # rates kept across restarts (and warmed ahead: `warm`)
    cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache_path and Path(self.cache_path).is_file():
            for row in json.loads(Path(self.cache_path).read_text(encoding="utf-8")):
                if row["profile"] == self._profile_key():
                    self.cache[tuple(map(_tuple, row["key"]))] = RoleRates(*row["rates"])

    def __call__(self, fc: Forecast, config: PlannerConfig) -> RoleRates:
        key = (fc.signature, config.slo_ttft_ms, config.slo_tpot_ms)
        if key not in self.cache:
            args = (
                self.profile_path,
                self.threads_per_worker,
                self.engine,
                fc.mix or DEFAULT_MIX,
                config.slo_ttft_ms,
                config.slo_tpot_ms,
            )
            if self.in_subprocess:
                self.cache[key] = _in_child(args)
            else:
                self.cache[key] = measure_rates(*args)
            self._save()
        return self.cache[key]

    def _profile_key(self) -> list:
        """What the cached rates depend on besides the mix and the SLO."""
        key = [str(Path(self.profile_path).resolve()), self.threads_per_worker, repr(self.engine)]
        return [*key, "busy-rates"]  # rows from before the contention term lack them

    def _save(self) -> None:
        if not self.cache_path:
            return
        rows = [
            {
                "profile": self._profile_key(),
                "key": list(key),
                "rates": list(dataclasses.astuple(rates)),
            }
            for key, rates in self.cache.items()
        ]
        Path(self.cache_path).write_text(json.dumps(rows), encoding="utf-8")


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _in_child(args: tuple) -> RoleRates:
    with multiprocessing.get_context("spawn").Pool(1, initializer=_lower_priority) as pool:
        return pool.apply_async(measure_rates, args).get(MEASURE_TIMEOUT_S)


def _lower_priority() -> None:
    os.nice(CHILD_NICENESS)


def measure_rates(
    profile_path: str,
    threads_per_worker: int,
    engine,
    mix: tuple[tuple[int, int], ...],
    slo_ttft_ms: float,
    slo_tpot_ms: float,
) -> RoleRates:
    """`phase_rates` for `mix` ((prompt, output) tokens per request) under the SLO, alone
    and (on a CPU host) beside a busy neighbour."""
    from pdserve.bench.types import SLO, RequestSpec
    from pdserve.config import EngineConfig
    from pdserve.sim.profile import Profile
    from pdserve.sim.search import SearchSettings, phase_rates

    specs = [
        RequestSpec(
            prompt=[1 + i % 30000] + [1] * (p - 1), max_tokens=max(1, o), num_prompt_tokens=p
        )
        for i, (p, o) in enumerate(itertools.islice(itertools.cycle(mix), MAX_REQUESTS))
    ]
    settings = SearchSettings(min_duration_s=10.0, max_requests=MAX_REQUESTS, max_probes=6)
    profile = Profile.load(profile_path)
    args = (profile, threads_per_worker, engine or EngineConfig(), specs)
    slo = SLO(slo_ttft_ms, slo_tpot_ms)
    alone = phase_rates(*args, slo, settings)
    rates = (alone.prefill.goodput, alone.decode.goodput, alone.mixed.goodput)
    if profile.hardware.get("device") != "cpu":  # own devices: no neighbour slows a worker
        return RoleRates(*rates)
    busy = phase_rates(*args, slo, settings, busy_workers=1)
    return RoleRates(*rates, busy.prefill.goodput, busy.decode.goodput, busy.mixed.goodput)
