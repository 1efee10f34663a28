"""`pdserve bench sweep` with `phases:`: one phase-shifting trace against every configuration.

A sweep YAML may give `phases:` (the list of a `bench run --phases` file: each phase a
workload, a rate, a duration, optionally its SLO and extra body fields) instead of
`workloads:`. Then there is no goodput search: each configuration, on a fresh
`pdserve serve` (bench/launcher.py), is sent the same trace once — the same prompts at the
same times (`search.seed`) — and scored by its goodput per phase and over the whole trace
(requests meeting their phase's SLO / the phase's length). This is how a static layout,
`auto` and an elastic cluster (`planner: slo`) are compared on one day whose traffic
changes (docs/benchmarks.md "Elastic P/D"). Results go to `sweep.json` (rewritten after
each configuration, like the search sweep) and a ranking table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.launcher import ServeProcess
from pdserve.bench.sweep_spec import ServerSpec, SweepSpec

FORMAT = "pdserve-bench-sweep-phases"
FORMAT_VERSION = 1

# (url, spec) -> the phases' summaries as `phases_to_dict` gives them ("all" last);
# injected in tests.
RunTrace = Callable[[str, SweepSpec], list[dict[str, Any]]]
Log = Callable[[str], None]


@dataclass(slots=True)
class PhasedResult:
    name: str
    settings: dict[str, Any]
    is_ok: bool = True
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)  # per phase, then "all"
    startup_s: float | None = None

    @property
    def goodput(self) -> float:
        """Whole-trace goodput (0 when the configuration failed)."""
        return self.phases[-1]["goodput"] if self.is_ok and self.phases else 0.0


def run_phased_sweep(
    spec: SweepSpec, out_dir: Path, run_trace: RunTrace | None = None, log: Log = print
) -> list[PhasedResult]:
    run_trace = run_trace or default_run_trace
    results: list[PhasedResult] = []
    for i, server in enumerate(spec.configurations):
        log(f"[{i + 1}/{len(spec.configurations)}] {server.name}: starting pdserve serve")
        results.append(_run_one(server, spec, out_dir, run_trace, log))
        write_json(results, out_dir / "sweep.json")
    return results


def _run_one(
    server: ServerSpec, spec: SweepSpec, out_dir: Path, run_trace: RunTrace, log: Log
) -> PhasedResult:
    result = PhasedResult(server.name, server.settings)
    log_path = out_dir / "logs" / f"{server.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = ServeProcess(server.settings, log_path)
    try:
        error = proc.start_error(spec.search.ready_timeout_s)
        if error is not None:
            return _failed(result, proc, error)
        result.startup_s = time.monotonic() - started
        try:
            result.phases = run_trace(proc.url, spec)
        except Exception as e:  # one broken configuration must not end the sweep
            return _failed(result, proc, f"{type(e).__name__}: {e}")
        log(f"  whole trace: goodput {result.goodput:.3f} req/s")
        return result
    finally:
        killed = proc.stop()
        if killed:
            log(f"  WARNING: killed processes that outlived the server: {killed}")


def _failed(result: PhasedResult, proc: ServeProcess, error: str) -> PhasedResult:
    result.is_ok, result.error, result.log_tail = False, error, proc.log_tail()
    return result


def default_run_trace(url: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """The phases' trace through `bench/loadgen.py`, summarized per phase."""
    from pdserve.bench import loadgen, phases

    load = phases.build_load(spec.phases, spec.search.seed)
    result = loadgen.run_benchmark_sync(
        url,
        loadgen.fetch_model_id(url),
        load.specs,
        loadgen.Arrival.trace(),
        extra_body={"ignore_eos": True} if spec.search.ignore_eos else None,
        seed=spec.search.seed,
        progress=False,
        config={"phases": phases.phases_config(load)},
    )
    return phases.phases_to_dict(phases.summarize_phases(result))


def ranking(results: list[PhasedResult]) -> list[PhasedResult]:
    return sorted(results, key=lambda r: (not r.is_ok, -r.goodput))


def format_ranking(results: list[PhasedResult]) -> str:
    """Markdown: per configuration, attainment / goodput of each phase and the trace."""
    first = next((r for r in results if r.phases), None)
    names = [p["name"] for p in first.phases] if first else []
    cells = " | ".join(f"{n} attain / goodput" for n in names)
    lines = [f"| # | configuration | {cells} | status |", "|---" * (len(names) + 3) + "|"]
    for rank, r in enumerate(ranking(results), 1):
        row = [f"{100 * p['attainment']:.0f} % / {p['goodput']:.3f}" for p in r.phases]
        row += ["-"] * (len(names) - len(row))
        status = "ok" if r.is_ok else f"FAILED: {r.error}"
        lines.append(f"| {rank} | {r.name} | " + " | ".join(row) + f" | {status} |")
    return "\n".join(lines)


def write_json(results: list[PhasedResult], path: Path) -> Path:
    data = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "configurations": [
            {
                "name": r.name,
                "settings": r.settings,
                "is_ok": r.is_ok,
                "error": r.error,
                "log_tail": r.log_tail,
                "startup_s": r.startup_s,
                "phases": r.phases,
            }
            for r in results
        ],
        "ranking": [r.name for r in ranking(results)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path
