"""The planner: which layout serves a workload best under its SLOs, from profiles.

DistServe-style search. A *unit* is one machine of a profile (a CPU box of `cores`
cores, or a GPU node of `devices_per_node` devices); a candidate layout uses every core or
device of the unit: aggregated (`m` mixed workers), disaggregated or auto (`p` prefill +
`d` decode workers), each worker `t` threads or devices (the profile's worker sizes),
with a chunk size (`max_num_batched_tokens`) and a batch limit (`max_num_seqs`). Each
candidate's unit goodput — the highest Poisson rate at which ≥ `attainment` of requests
meet both SLOs — comes from the goodput search of `pdserve bench goodput`
(`bench/goodput.py`: double, then bisect), with `pdserve sim` as the server. The budget
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

from pdserve.bench.goodput import search_goodput
from pdserve.bench.loadgen import Arrival
from pdserve.bench.types import SLO, RequestSpec, RunResult
from pdserve.config import EngineConfig
from pdserve.serve import ServeConfig
from pdserve.sim.cost_model import StepShape
from pdserve.sim.profile import Profile
from pdserve.sim.run import simulate

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
    output_throughput: float  # tok/s of one unit at its goodput rate
    replicas: int
    price_per_unit_hour: float | None

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


def estimate_rate(candidate: Candidate, specs: Sequence[RequestSpec]) -> float:
    """A first probe for the search: the unit's prefill capacity in requests/s from the
    cost model (prompt tokens in chunks), capped by a decode estimate."""
    cost = candidate.profile.cost(candidate.serve.threads_per_worker or 1)
    counts = candidate.serve.worker_counts()
    prompts = [s.num_prompt_tokens or _words(s) for s in specs]
    mean_prompt = sum(prompts) / len(prompts)
    mean_output = sum(s.max_tokens for s in specs) / len(specs)
    chunk = candidate.serve.engine.max_num_batched_tokens or 2048
    q = min(mean_prompt, chunk)
    prefill_s = cost.seconds(StepShape(int(q), 1, int(q * q), 0)) * mean_prompt / q
    batch = min(32, candidate.serve.engine.max_num_seqs)
    decode_s = cost.seconds(StepShape(batch, batch, 0, int(batch * mean_prompt))) / batch
    prefillers = counts["prefill"] + counts["mixed"] or counts["decode"]
    decoders = counts["decode"] + counts["mixed"]
    return max(0.05, min(prefillers / prefill_s, decoders / (decode_s * mean_output)))


def _words(spec: RequestSpec) -> int:
    if isinstance(spec.prompt, str):
        return len(spec.prompt.split()) + 1
    return sum(len(m.get("content", "").split()) + 2 for m in spec.messages or []) + 1


def evaluate(
    candidate: Candidate,
    specs: Sequence[RequestSpec],
    slo: SLO,
    *,
    attainment: float = 0.9,
    min_duration_s: float = 20.0,
    min_requests: int = 40,
    max_requests: int = 400,
    max_probes: int = 8,
    rel_tol: float = 0.1,
    seed: int = 0,
) -> tuple[float, bool, float]:
    """(unit goodput, is a lower bound, output tok/s at that rate) of one candidate."""

    # Pools larger than every running request at its longest, twice over, change nothing
    # but set-up time (a GPU's pool holds ~10^5 blocks).
    longest = max((s.num_prompt_tokens or _words(s)) + s.max_tokens for s in specs)
    engine = candidate.serve.engine
    max_blocks = 2 * engine.max_num_seqs * -(-longest // engine.block_size)

    def run_at_rate(rate: float) -> RunResult:
        n = max(min_requests, min(max_requests, math.ceil(rate * min_duration_s)))
        return simulate(
            candidate.serve,
            candidate.profile,
            specs,
            Arrival.poisson(rate),
            num_requests=n,
            seed=seed,
            max_blocks=max_blocks,
        )

    result = search_goodput(
        run_at_rate,
        slo,
        attainment=attainment,
        start_rate=estimate_rate(candidate, specs),
        max_probes=max_probes,
        rel_tol=rel_tol,
        num_cores=candidate.num_devices,
    )
    best = next((p for p in result.probes if p.rate == result.goodput), None)
    throughput = best.summary.output_throughput if best else 0.0
    return result.goodput, result.is_lower_bound, throughput


def make_plans(
    profiles: Sequence[tuple[Profile, float | None]],
    specs: Sequence[RequestSpec],
    slo: SLO,
    budget: Budget,
    space: SearchSpace,
    on_plan: Callable[[Plan], None] | None = None,
    **search,
) -> list[Plan]:
    """Every candidate of every (profile, price per unit-hour), ranked best first."""
    plans = []
    for profile, price in profiles:
        num_units = replicas(profile, budget, price)
        for candidate in candidates(profile, space):
            goodput, is_lower, throughput = evaluate(candidate, specs, slo, **search)
            plan = Plan(candidate, goodput, is_lower, throughput, num_units, price)
            plans.append(plan)
            if on_plan is not None:
                on_plan(plan)
    cost = lambda p: p.cost_per_million_output_tokens or math.inf  # noqa: E731
    return sorted(plans, key=lambda p: (-p.goodput, cost(p)))


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
