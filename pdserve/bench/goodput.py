"""Goodput search: the highest request rate a server sustains within its SLOs.

DistServe's definition: goodput is the highest Poisson arrival rate at which at least a
target fraction (90% by default) of requests meet both the TTFT and the TPOT SLO. It is
reported per machine (the rate itself) and per core, so configurations using different
numbers of cores compare fairly.

- `search_goodput(run_at_rate, slo, ...) -> GoodputResult`: the search, over any
  `run_at_rate(rate) -> RunResult` — a live benchmark, or a stub in tests.
- `find_goodput(url, model, specs, slo, ...) -> GoodputResult`: the search against a
  server with Poisson arrivals, each probe a run of `num_requests` or `duration_s`.
- `GoodputResult`: the goodput, the target, and every probe as `Probe(rate, summary)` in
  the order probed (what the report plots as attainment and throughput against rate),
  plus the run at the goodput rate; `goodput_to_dict`/`goodput_from_dict` save it.
- `format_goodput(result) -> str`: the probes as a table and the answer.

The search: probe `start_rate`; double while probes pass (or halve while they fail) until
one passing and one failing rate bracket the answer; then bisect the bracket until its
ends are within `rel_tol` of each other. Every probe costs one full run, so the number of
probes is bounded (`max_probes`) and the answer is the highest rate that *passed* —
never an extrapolation. When every probe passed, the budget ran out before the answer was
bracketed: the result says so (`is_lower_bound`, printed as ">="); raise `start_rate` or
`max_probes`. It assumes attainment falls as the rate rises; a noisy probe can only make
the answer conservative or optimistic by one bracket step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pdserve.bench import metrics
from pdserve.bench.types import SLO, RequestSpec, RunResult, Summary
from pdserve.errors import ConfigError


class Probe(NamedTuple):
    rate: float  # offered Poisson rate, requests/s
    summary: Summary


@dataclass(frozen=True, slots=True)
class GoodputResult:
    goodput: float  # requests/s per machine; 0.0 when no probed rate passed
    slo: SLO
    attainment_target: float
    num_cores: int
    probes: tuple[Probe, ...]  # in the order probed
    best_run: RunResult | None = None  # the run at the goodput rate

    @property
    def goodput_per_core(self) -> float:
        return self.goodput / self.num_cores

    @property
    def is_lower_bound(self) -> bool:
        """True when no probed rate failed: the goodput is at least this, maybe more."""
        return bool(self.probes) and all(self.is_passing(p) for p in self.probes)

    def is_passing(self, probe: Probe) -> bool:
        return (probe.summary.slo_attainment or 0.0) >= self.attainment_target


def search_goodput(
    run_at_rate: Callable[[float], RunResult],
    slo: SLO,
    *,
    attainment: float = 0.9,
    start_rate: float = 1.0,
    max_probes: int = 8,
    rel_tol: float = 0.05,
    min_rate: float = 0.01,
    num_cores: int | None = None,
    price_per_hour: float | None = None,
    on_probe: Callable[[Probe, bool], None] | None = None,
) -> GoodputResult:
    """Find the highest rate whose attainment is >= `attainment` (see the module doc).

    `on_probe(probe, is_passing)` is called after each run (for progress output).
    Halving stops below `min_rate` (goodput 0.0: even a trickle misses the SLOs).
    """
    _check_search(attainment, start_rate, max_probes, rel_tol, min_rate)
    probes: list[Probe] = []
    best: tuple[Probe, RunResult] | None = None  # highest passing rate so far
    lowest_failing: float | None = None
    rate: float | None = start_rate
    while rate is not None and len(probes) < max_probes:
        run = run_at_rate(rate)
        probe = Probe(rate, metrics.summarize(run, slo, price_per_hour))
        probes.append(probe)
        is_passing = (probe.summary.slo_attainment or 0.0) >= attainment
        if on_probe is not None:
            on_probe(probe, is_passing)
        if is_passing:
            best = (probe, run)
        else:
            lowest_failing = rate
        rate = _next_rate(best[0].rate if best else None, lowest_failing, rel_tol, min_rate)
    return GoodputResult(
        goodput=best[0].rate if best else 0.0,
        slo=slo,
        attainment_target=attainment,
        num_cores=num_cores or os.cpu_count() or 1,
        probes=tuple(probes),
        best_run=best[1] if best else None,
    )


def _next_rate(
    passing: float | None, failing: float | None, rel_tol: float, min_rate: float
) -> float | None:
    """The next rate to probe, or None when the search is done."""
    if failing is None:
        assert passing is not None
        return passing * 2
    if passing is None:
        return failing / 2 if failing / 2 >= min_rate else None
    if failing / passing - 1 <= rel_tol:
        return None
    return (passing + failing) / 2


def _check_search(
    attainment: float, start_rate: float, max_probes: int, rel_tol: float, min_rate: float
) -> None:
    if not 0 < attainment <= 1:
        raise ConfigError("attainment", f"must be in (0, 1], got {attainment}")
    if start_rate <= 0 or min_rate <= 0:
        raise ConfigError("start_rate", f"rates must be > 0, got {start_rate} and {min_rate}")
    if max_probes < 1:
        raise ConfigError("max_probes", f"must be >= 1, got {max_probes}")
    if rel_tol <= 0:
        raise ConfigError("rel_tol", f"must be > 0, got {rel_tol}")


def find_goodput(
    url: str,
    model: str,
    specs: Sequence[RequestSpec],
    slo: SLO,
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
    min_duration_s: float = 0.0,
    endpoint: str = "completions",
    extra_body: dict[str, Any] | None = None,
    api_key: str | None = None,
    seed: int = 0,
    request_timeout_s: float | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    **search: Any,
) -> GoodputResult:
    """`search_goodput` against a live server: each probe is a Poisson run of
    `num_requests` (or `duration_s`) on `specs` — with `min_duration_s`, at least
    `rate * min_duration_s` requests, so a fast rate is held long enough to reach a
    steady state instead of measuring one burst — its config recording the SLO
    (`slo_ttft_ms`, `slo_tpot_ms`) and `config`; `search` takes `search_goodput`'s keyword
    arguments (attainment, start_rate, max_probes, rel_tol, num_cores, on_probe, ...).

    Each probe starts where the previous one stopped in `specs` (wrapping around at the
    end): a request sent again would find its prompt in the server's prefix cache and make
    later probes look faster than the workload is. Give at least as many specs as all
    probes send (`specs_for_search`) and no prompt is sent twice."""
    from pdserve.bench.loadgen import DEFAULT_REQUEST_TIMEOUT_S, Arrival, run_benchmark_sync

    cursor = 0

    def run_at_rate(rate: float) -> RunResult:
        nonlocal cursor
        count = num_requests
        if count is not None and min_duration_s > 0:
            count = max(count, math.ceil(rate * min_duration_s))
        rotated = [*specs[cursor:], *specs[:cursor]]
        result = run_benchmark_sync(
            url,
            model,
            rotated,
            Arrival.poisson(rate),
            num_requests=count,
            duration_s=duration_s,
            endpoint=endpoint,
            extra_body=extra_body,
            api_key=api_key,
            seed=seed,
            request_timeout_s=request_timeout_s or DEFAULT_REQUEST_TIMEOUT_S,
            progress=progress,
            config={"slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms, **(config or {})},
        )
        cursor = (cursor + len(result.records)) % len(specs)
        return result

    return search_goodput(run_at_rate, slo, **search)


def specs_for_search(
    num_requests: int, min_duration_s: float, start_rate: float, max_probes: int
) -> int:
    """Requests a search can send in all (rates at most double each probe from
    `start_rate`), so that `find_goodput` never has to send one twice."""
    top_rate = start_rate * 2 ** (max_probes - 1)
    return max_probes * max(num_requests, math.ceil(top_rate * min_duration_s))


def format_goodput(result: GoodputResult) -> str:
    lines = [
        f"{'rate':>8}  {'attain':>7}  {'req/s':>7}  {'goodput':>7}  {'TTFT p90':>9}  {'TPOT p90':>9}",
        f"{'req/s':>8}  {'':>7}  {'':>7}  {'req/s':>7}  {'ms':>9}  {'ms':>9}",
    ]
    for probe in sorted(result.probes, key=lambda p: p.rate):
        s = probe.summary
        lines.append(
            f"{probe.rate:>8.3f}  {100 * (s.slo_attainment or 0.0):>6.1f}%  "
            f"{s.request_throughput:>7.3f}  {s.goodput or 0.0:>7.3f}  "
            f"{_p90(s.ttft_ms):>9}  {_p90(s.tpot_ms):>9}  "
            f"{'pass' if result.is_passing(probe) else 'fail'}"
        )
    lines += [
        "",
        f"SLO: TTFT <= {result.slo.ttft_ms:g} ms, TPOT <= {result.slo.tpot_ms:g} ms, "
        f"for >= {100 * result.attainment_target:g}% of requests",
        f"goodput: {'>= ' if result.is_lower_bound else ''}{result.goodput:.3f} req/s per "
        f"machine, {result.goodput_per_core:.3f} req/s per core ({result.num_cores} cores)"
        + (" — every probe passed: a lower bound" if result.is_lower_bound else ""),
    ]
    return "\n".join(lines)


def _p90(p) -> str:
    return "-" if p is None else f"{p.p90:.1f}"


def goodput_to_dict(result: GoodputResult) -> dict[str, Any]:
    return {
        "format": "pdserve-bench-goodput",
        "goodput": result.goodput,
        "goodput_per_core": result.goodput_per_core,
        "slo": dataclasses.asdict(result.slo),
        "attainment_target": result.attainment_target,
        "num_cores": result.num_cores,
        "probes": [
            {"rate": p.rate, "summary": metrics.summary_to_dict(p.summary)} for p in result.probes
        ],
        "best_run": None if result.best_run is None else metrics.run_to_dict(result.best_run),
    }


def goodput_from_dict(data: Mapping[str, Any]) -> GoodputResult:
    best = data.get("best_run")
    return GoodputResult(
        goodput=data["goodput"],
        slo=SLO(**data["slo"]),
        attainment_target=data["attainment_target"],
        num_cores=data["num_cores"],
        probes=tuple(
            Probe(p["rate"], metrics.summary_from_dict(p["summary"])) for p in data["probes"]
        ),
        best_run=None if best is None else metrics.run_from_dict(best),
    )
