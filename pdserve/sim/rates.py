"""`SimRates`: the SLO planner's rate model (control/planner.py `RateModel`) from the
simulator — one worker's goodput per role for the forecast's length mix, by
`sim/search.py`'s `phase_rates` on a `pdserve profile` cost model, cached by the mix's
coarse signature (a few seconds of simulation per new mix, run off the event loop by the
planner)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.bench.types import SLO, RequestSpec
from pdserve.config import EngineConfig
from pdserve.control.planner import Forecast, PlannerConfig, RoleRates
from pdserve.sim.profile import Profile
from pdserve.sim.search import SearchSettings, phase_rates


@dataclass
class SimRates:
    """One worker's goodput per role for a forecast's mix (module docstring)."""

    profile_path: str
    threads_per_worker: int = 1
    engine: object = None  # EngineConfig of the workers (defaults)
    cache: dict = field(default_factory=dict)

    def __call__(self, fc: Forecast, config: PlannerConfig) -> RoleRates:
        key = fc.signature
        if key not in self.cache:
            self.cache[key] = self._measure(fc, config)
        return self.cache[key]

    def _measure(self, fc: Forecast, config: PlannerConfig) -> RoleRates:
        profile = Profile.load(self.profile_path)
        specs = [
            RequestSpec(prompt=[1] * p, max_tokens=max(1, o), num_prompt_tokens=p)
            for p, o in (fc.mix or ((256, 128),))
        ]
        slo = SLO(config.slo_ttft_ms, config.slo_tpot_ms)
        settings = SearchSettings(min_duration_s=10.0, max_requests=400, max_probes=6)
        engine = self.engine or EngineConfig()
        found = phase_rates(profile, self.threads_per_worker, engine, specs, slo, settings)
        return RoleRates(found.prefill.goodput, found.decode.goodput, found.mixed.goodput)
