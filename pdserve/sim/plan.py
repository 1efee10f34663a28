"""The planner: which layout serves a workload best under its SLOs, from profiles.

DistServe-style search. A *unit* is one machine of a profile (a CPU box of `cores`
cores, or a GPU node of `devices_per_node` devices); a candidate layout uses every core or
device of the unit: aggregated (`m` mixed workers), disaggregated or auto (`p` prefill +
`d` decode workers), each worker `t` threads or devices (the profile's worker sizes),
with a chunk size (`max_num_batched_tokens`) and a batch limit (`max_num_seqs`). Each
candidate's unit goodput — the highest Poisson rate at which ≥ `attainment` of requests
meet both SLOs — comes from the goodput search of `pdserve bench goodput` with `pdserve
sim` as the server (sim/search.py); a unit with many candidates (a GPU node) is first
ranked from one worker's goodput per phase (DistServe's rule: a P:D split serves
min(p x prefill rate, d x decode rate)) and its best candidates checked whole. The budget
(cores, devices, nodes or $/hour) buys whole units; units are independent replicas behind
a load balancer, so the cluster's goodput is `replicas x unit goodput`: a 1,000-node plan
simulates one node per candidate, never 1,000.

Ranked by cluster goodput (then cost): each plan reports goodput per device (core or
GPU), cost per 1M output tokens at the goodput rate (from a price per unit-hour), and
`launch_yaml` gives the `pdserve serve --config` file of a unit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.bench.types import SLO, RequestSpec
from pdserve.config import EngineConfig
from pdserve.serve_config import ServeConfig
from pdserve.sim.profile import Profile
from pdserve.sim.search import Found, PhaseRates, SearchSettings, phase_rates, search_rate

MODES = ("aggregated", "disaggregated", "auto")


@dataclass(frozen=True)
class Candidate:
    profile: Profile
    serve: ServeConfig
    num_devices: int  # cores (CPU) or devices (GPU) of one unit: all of them

    @property
    def label(self) -> str:
        s, counts = self.serve, self.serve.worker_counts()
        if s.mode == "aggregated":
            workers = f"{counts['mixed']} mixed"
        else:
            workers = f"{counts['prefill']}P:{counts['decode']}D"
        return (
            f"{s.mode} {workers} x{s.threads_per_worker}, chunk "
            f"{s.engine.max_num_batched_tokens}, seqs {s.engine.max_num_seqs}"
        )


@dataclass(frozen=True)
class Plan:
    candidate: Candidate
    unit_goodput: float  # req/s of one unit within the SLOs
    is_lower_bound: bool
    output_throughput: float  # tok/s of one unit at its goodput rate (rate x mean output)
    replicas: int
    price_per_unit_hour: float | None
    is_estimate: bool = False  # from per-worker phase rates, not a whole-unit search

    @property
    def goodput(self) -> float:
        return self.unit_goodput * self.replicas

    @property
    def goodput_per_device(self) -> float:
        return self.unit_goodput / self.candidate.num_devices

    @property
    def cost_per_million_output_tokens(self) -> float | None:
        if self.price_per_unit_hour is None or self.output_throughput <= 0:
            return None
        return self.price_per_unit_hour / (self.output_throughput * 3600) * 1e6


@dataclass(frozen=True)
class Budget:
    cores: int | None = None  # CPU profiles
    devices: int | None = None  # GPU profiles
    nodes: int | None = None
    per_hour: float | None = None  # $ / hour, needs a price


@dataclass(frozen=True)
class SearchSpace:
    modes: tuple[str, ...] = MODES
    chunk_sizes: tuple[int, ...] = (512, 2048)
    max_num_seqs: tuple[int, ...] = (64,)
    sizes: tuple[int, ...] | None = None  # worker sizes; default: the profile's
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)


def candidates(profile: Profile, space: SearchSpace) -> list[Candidate]:
    """Every layout of one unit of `profile` in `space` that uses all its cores/devices."""
    unit = profile.cores
    found = []
    for size in space.sizes or profile.sizes:
        if size not in profile.costs or unit % size:
            continue
        num_workers = unit // size
        for mode in space.modes:
            for counts in _splits(mode, num_workers):
                for chunk in space.chunk_sizes:
                    for seqs in space.max_num_seqs:
                        engine = dataclasses.replace(
                            space.engine, max_num_batched_tokens=chunk, max_num_seqs=seqs
                        )
                        serve = ServeConfig(
                            mode=mode, threads_per_worker=size, engine=engine, **counts
                        )
                        found.append(Candidate(profile, serve, unit))
    return found


def _splits(mode: str, num_workers: int) -> list[dict[str, int]]:
    if mode == "aggregated":
        return [{"mixed_workers": num_workers}]
    return [
        {"prefill_workers": p, "decode_workers": num_workers - p} for p in range(1, num_workers)
    ]


def replicas(profile: Profile, budget: Budget, price: float | None) -> int:
    """Whole units the budget buys (at least 1: the plan of a single unit)."""
    limits = []
    if budget.cores is not None:
        limits.append(budget.cores // profile.cores)
    if budget.devices is not None:
        limits.append(budget.devices // profile.cores)
    if budget.nodes is not None:
        limits.append(budget.nodes)
    if budget.per_hour is not None and price:
        limits.append(int(budget.per_hour // price))
    return max(1, min(limits)) if limits else 1


def make_plans(
    profiles: Sequence[tuple[Profile, float | None]],
    specs: Sequence[RequestSpec],
    slo: SLO,
    budget: Budget,
    space: SearchSpace,
    on_plan: Callable[[Plan], None] | None = None,
    settings: SearchSettings | None = None,
    exhaustive_limit: int = 12,
    num_verified: int = 1,
) -> list[Plan]:
    """Every candidate of every (profile, price per unit-hour), ranked best first. Up to
    `exhaustive_limit` candidates a profile, each is searched as a whole unit; past that,
    from per-worker phase rates (sim/search.py), the best `num_verified` then checked as
    whole units."""
    settings = settings or SearchSettings()
    mean_output = sum(s.max_tokens for s in specs) / len(specs)
    plans = []
    for profile, price in profiles:
        num_units = replicas(profile, budget, price)
        found = candidates(profile, space)
        if len(found) <= exhaustive_limit:
            for candidate in found:
                result = search_rate(candidate.serve, profile, specs, slo, settings)
                plans.append(_plan(candidate, result, mean_output, num_units, price, on_plan))
        else:
            estimated = _estimates(found, specs, slo, settings, num_units, price)
            estimated.sort(key=lambda p: -p.unit_goodput)
            for plan in estimated[:num_verified]:
                serve, guess = plan.candidate.serve, plan.unit_goodput
                result = search_rate(serve, profile, specs, slo, settings, start_rate=guess)
                plans.append(_plan(plan.candidate, result, mean_output, num_units, price, on_plan))
            for plan in estimated[num_verified:]:
                plans.append(plan)
                if on_plan is not None:
                    on_plan(plan)
    cost = lambda p: p.cost_per_million_output_tokens or math.inf  # noqa: E731
    return sorted(plans, key=lambda p: (-p.goodput, p.is_estimate, cost(p)))


def _plan(candidate, result: Found, mean_output, num_units, price, on_plan) -> Plan:
    # Tokens/s delivered at the goodput rate in steady state (a probe's own average
    # includes its ramp and drain, which would bias short probes).
    plan = Plan(
        candidate,
        result.goodput,
        result.is_lower_bound,
        result.goodput * mean_output,
        num_units,
        price,
    )
    if on_plan is not None:
        on_plan(plan)
    return plan


def _estimates(found, specs, slo, settings, num_units, price) -> list[Plan]:
    """Each candidate's unit goodput from one worker's phase rates: m x mixed, or
    min(p x prefill, d x decode) (auto: the same as its disaggregated split)."""
    # Screening is coarse (short probes, a loose bracket); the best are re-checked whole.
    settings = dataclasses.replace(
        settings,
        min_duration_s=min(settings.min_duration_s, 5.0),
        max_requests=min(settings.max_requests, 300),
        max_probes=min(settings.max_probes, 5),
        rel_tol=max(settings.rel_tol, 0.25),
    )
    rates: dict[tuple, PhaseRates] = {}
    mean_output = sum(s.max_tokens for s in specs) / len(specs)
    plans = []
    for candidate in found:
        serve = candidate.serve
        key = (serve.threads_per_worker, serve.engine)
        if key not in rates:
            rates[key] = phase_rates(candidate.profile, *key, specs, slo, settings)
        r, counts = rates[key], serve.worker_counts()
        if serve.mode == "aggregated":
            goodput = counts["mixed"] * r.mixed.goodput
        else:
            goodput = min(
                counts["prefill"] * r.prefill.goodput, counts["decode"] * r.decode.goodput
            )
        plan = Plan(candidate, goodput, False, goodput * mean_output, num_units, price)
        plans.append(dataclasses.replace(plan, is_estimate=True))
    return plans


def launch_yaml(plan: Plan) -> str:
    """The `pdserve serve --config` file of one unit of `plan`."""
    import yaml

    s = plan.candidate.serve
    counts = s.worker_counts()
    data = {"mode": s.mode, **{f"{role}_workers": n for role, n in counts.items() if n}}
    data["threads_per_worker"] = s.threads_per_worker
    defaults = EngineConfig()
    engine = {
        f.name: getattr(s.engine, f.name)
        for f in dataclasses.fields(EngineConfig)
        if getattr(s.engine, f.name) != getattr(defaults, f.name)
    }
    if engine:
        data["engine"] = engine
    return yaml.safe_dump(data, sort_keys=False)
