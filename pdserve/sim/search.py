"""Goodput of simulated layouts: the rate search, and DistServe's split by phase.

`search_rate` is `pdserve bench goodput`'s search (`bench/goodput.py`: double, then
bisect, the highest Poisson rate at which >= `attainment` of requests meet both SLOs) with
`pdserve sim` as the server. Each probe holds its rate for `min_duration_s` and sends at
least 1.5 times as many requests as the layout has sequence slots, so a probe is a
steady state, not a burst the batch absorbs whole (capped at `max_requests`).

`phase_rates` is how a large unit is planned without simulating every P:D split: the
goodput of ONE worker of a kind, per phase —
- mixed: a one-worker aggregated deployment under both SLOs;
- prefill: the same worker sent the prompts alone (`max_tokens` 1: what a prefill worker
  computes) under the TTFT SLO;
- decode: a 1P:1D disaggregated deployment whose prefill worker costs nothing, so TTFT
  measures only the wait for decode slots, under both SLOs.
A split of `p` prefill and `d` decode workers then serves about `min(p x prefill, d x
decode)` (DistServe's placement rule), `m` mixed workers `m x mixed`; the planner checks
its best estimates with whole-unit searches. `busy_workers=1` rates the same worker
beside a neighbour that steps all along (sim/sharing.py: shared cores and memory
bandwidth), the SLO planner's contention term.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.bench.goodput import search_goodput
from pdserve.bench.loadgen import Arrival
from pdserve.bench.types import SLO, RequestSpec, RunResult
from pdserve.serve_config import ServeConfig
from pdserve.sim.cost_model import StepCost, StepShape
from pdserve.sim.profile import Profile
from pdserve.sim.run import simulate

FREE = StepCost((1,), (0.0,), 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class SearchSettings:
    attainment: float = 0.9
    min_duration_s: float = 20.0
    max_requests: int = 2000
    max_probes: int = 8
    rel_tol: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Found:
    goodput: float  # req/s
    is_lower_bound: bool
    output_throughput: float  # tok/s at that rate (0 when none passed)


def search_rate(
    serve: ServeConfig,
    profile: Profile,
    specs: Sequence[RequestSpec],
    slo: SLO,
    settings: SearchSettings,
    start_rate: float | None = None,
    role_costs: dict[str, StepCost] | None = None,
    busy_workers: int = 0,
) -> Found:
    """The goodput of `serve` under `specs` and `slo`, simulated."""
    num_workers = sum(serve.worker_counts().values())
    min_requests = max(40, 3 * num_workers * serve.engine.max_num_seqs // 2)
    max_blocks = _pool_cap(serve, specs)

    def run_at_rate(rate: float) -> RunResult:
        n = max(min_requests, math.ceil(rate * settings.min_duration_s))
        return simulate(
            serve,
            profile,
            specs,
            Arrival.poisson(rate),
            num_requests=min(n, settings.max_requests),
            seed=settings.seed,
            max_blocks=max_blocks,
            role_costs=role_costs,
            busy_workers=busy_workers,
        )

    result = search_goodput(
        run_at_rate,
        slo,
        attainment=settings.attainment,
        start_rate=start_rate or estimate_rate(serve, profile, specs),
        max_probes=settings.max_probes,
        rel_tol=settings.rel_tol,
        num_cores=num_workers,
    )
    best = next((p for p in result.probes if p.rate == result.goodput), None)
    throughput = best.summary.output_throughput if best else 0.0
    return Found(result.goodput, result.is_lower_bound, throughput)


def _pool_cap(serve: ServeConfig, specs: Sequence[RequestSpec]) -> int:
    """Pools larger than every running request at its longest, twice over, change nothing
    but set-up time (a GPU's pool holds ~10^5 blocks)."""
    longest = max(prompt_tokens(s) + s.max_tokens for s in specs)
    engine = serve.engine
    return 2 * engine.max_num_seqs * -(-longest // engine.block_size)


def estimate_rate(serve: ServeConfig, profile: Profile, specs: Sequence[RequestSpec]) -> float:
    """A first probe: the layout's prefill capacity in requests/s from the cost model,
    capped by a decode estimate (batches of up to 32)."""
    cost = profile.cost(serve.threads_per_worker or 1)
    counts = serve.worker_counts()
    mean_prompt = sum(map(prompt_tokens, specs)) / len(specs)
    mean_output = sum(s.max_tokens for s in specs) / len(specs)
    q = min(mean_prompt, serve.engine.max_num_batched_tokens or 2048)
    prefill_s = cost.seconds(StepShape(int(q), 1, int(q * q), 0)) * mean_prompt / q
    batch = min(32, serve.engine.max_num_seqs)
    decode_s = cost.seconds(StepShape(batch, batch, 0, int(batch * mean_prompt))) / batch
    prefillers = counts["prefill"] + counts["mixed"] or counts["decode"]
    decoders = counts["decode"] + counts["mixed"]
    return max(0.05, min(prefillers / prefill_s, decoders / max(decode_s * mean_output, 1e-9)))


def prompt_tokens(spec: RequestSpec) -> int:
    """The spec's prompt length: measured, else BOS + one token a word (the built-in
    model's count, bench/prompts.py)."""
    if spec.num_prompt_tokens is not None:
        return spec.num_prompt_tokens
    if isinstance(spec.prompt, str):
        return len(spec.prompt.split()) + 1
    if spec.prompt is not None:
        return len(spec.prompt)
    return sum(len(m.get("content", "").split()) + 2 for m in spec.messages or []) + 2


@dataclass(frozen=True)
class PhaseRates:
    mixed: Found
    prefill: Found
    decode: Found


def phase_rates(
    profile: Profile,
    size: int,
    engine,
    specs: Sequence[RequestSpec],
    slo: SLO,
    settings: SearchSettings,
    busy_workers: int = 0,
) -> PhaseRates:
    """One worker's goodput per role (see the module docstring)."""
    one = ServeConfig(mode="aggregated", mixed_workers=1, threads_per_worker=size, engine=engine)
    mixed = search_rate(one, profile, specs, slo, settings, busy_workers=busy_workers)
    prompts = [dataclasses.replace(s, max_tokens=1) for s in specs]
    prefill = search_rate(one, profile, prompts, slo, settings, busy_workers=busy_workers)
    pair = ServeConfig(
        mode="disaggregated",
        prefill_workers=1,
        decode_workers=1,
        threads_per_worker=size,
        engine=engine,
    )
    free = {"prefill": FREE}
    decode = search_rate(pair, profile, specs, slo, settings, None, free, busy_workers)
    return PhaseRates(mixed, prefill, decode)
