"""`pdserve bench sweep sweep.yaml`: the goodput of each server configuration, ranked.

For each configuration in the YAML, in order: launch `pdserve serve` with it on free
ports (`bench/launcher.py`), wait for "pdserve ready", run a goodput search
(`bench/goodput.py`) for every workload, stop the server and check that none of its
processes outlived it. Then rank configurations by goodput per core, print the ranking,
and write `sweep.json`, `sweep.html` and one server log per configuration to the output
folder (`--out`, default `sweep-<yaml name>`). A configuration whose server exits or
never gets ready is recorded as failed with the tail of its log, and the sweep goes on;
`sweep.json` is rewritten after every configuration, so an interrupted sweep keeps what
it measured.

The YAML (every key but `configurations` optional):

    configurations:            # each: `pdserve serve` settings (ServeConfig fields)
      - name: aggregated       # optional label; default "<index>-<mode>"
        mode: aggregated
        mixed_workers: 1
        threads_per_worker: 2
        engine: {max_num_batched_tokens: 512, max_num_seqs: 32}
      - name: disaggregated
        mode: disaggregated
        prefill_workers: 1
        decode_workers: 1
        threads_per_worker: 1
        kv_backend: shm
    workloads:                 # names, or mappings with an SLO override; default [chat]
      - chat
      - name: code
        slo: {ttft_ms: 500, tpot_ms: 80}
    search:                    # goodput search settings
      attainment: 0.9          # fraction of requests that must meet both SLOs
      num_requests: 50         # requests per probe (one probe = one run at one rate)
      min_duration_s: 0        # and at least rate x this: hold each rate this long
      max_probes: 6            # runs per search at most (">=" marks an unbracketed result)
      start_rate: 1.0          # first rate probed, requests/s
      rel_tol: 0.1             # stop when the pass/fail bracket is this tight
      cores: 2                 # cores of the machine (default: this machine's)
      price_per_hour: null     # machine $/hour, for cost per 1M output tokens
      ignore_eos: true         # outputs run to max_tokens (pdserve understands it)
      ready_timeout_s: 300     # server start-up limit
      seed: 0                  # workload sampling and arrivals

With `phases:` (a `bench run --phases` list) instead of `workloads:`, each configuration
is sent that one phase-shifting trace instead of goodput searches (bench/sweep_phases.py).

Every configuration is validated with `ServeConfig.from_dict` before anything starts;
`port` and `router_port` are chosen by the sweep and may not be set. Errors name the
field, e.g. `configurations[1].engine.max_num_seqs: expected int, got 'many'`.

Goodput per core: the goodput (highest rate with attainment >= target, requests/s)
divided by the cores a configuration can use: its workers × threads per worker, at
most `search.cores`. A configuration's score is the geometric mean of its goodput per
core over the workloads (0 when any workload found none), so no workload dominates by
its scale.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench import report
from pdserve.bench.goodput import GoodputResult, Probe, goodput_to_dict
from pdserve.bench.launcher import ServeProcess
from pdserve.bench.sweep_spec import SearchSettings, ServerSpec, SweepSpec, WorkloadSpec

FORMAT = "pdserve-bench-sweep"
FORMAT_VERSION = 1

# (url, workload, settings, num_cores) -> the search's result; injected in tests.
Search = Callable[[str, WorkloadSpec, SearchSettings, int], GoodputResult]
Log = Callable[[str], None]


@dataclass(slots=True)
class ConfigurationResult:
    name: str
    settings: dict[str, Any]
    num_cores: int
    is_ok: bool = True
    error: str | None = None  # why the configuration failed, or None
    log_tail: list[str] = field(default_factory=list)  # server output, when failed
    searches: dict[str, GoodputResult] = field(default_factory=dict)  # by workload
    workload_errors: dict[str, str] = field(default_factory=dict)
    server_pids: list[int] = field(default_factory=list)  # launcher and workers
    killed_pids: list[int] = field(default_factory=list)  # outlived the server: killed
    startup_s: float | None = None

    def goodput_per_core(self, workload: str) -> float:
        search = self.searches.get(workload)
        return search.goodput / self.num_cores if search else 0.0

    def score(self, workloads: Sequence[str]) -> float:
        """Geometric mean of goodput per core over `workloads`."""
        values = [self.goodput_per_core(w) for w in workloads]
        if not self.is_ok or not values or min(values) <= 0:
            return 0.0
        return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass(slots=True)
class SweepResult:
    spec: SweepSpec
    results: list[ConfigurationResult]

    def ranking(self) -> list[ConfigurationResult]:
        names = self.spec.workload_names()
        return sorted(self.results, key=lambda r: (not r.is_ok, -r.score(names)))


def run_sweep(
    spec: SweepSpec,
    out_dir: Path,
    search: Search | None = None,
    log: Log = print,
) -> SweepResult:
    search = search or default_search
    sweep = SweepResult(spec, [])
    for i, server in enumerate(spec.configurations):
        log(f"[{i + 1}/{len(spec.configurations)}] {server.name}: starting pdserve serve")
        sweep.results.append(run_configuration(server, spec, out_dir, search, log))
        write_json(sweep, out_dir / "sweep.json")
    return sweep


def run_configuration(
    server: ServerSpec, spec: SweepSpec, out_dir: Path, search: Search, log: Log
) -> ConfigurationResult:
    result = ConfigurationResult(server.name, server.settings, spec.num_cores(server))
    log_path = out_dir / "logs" / f"{server.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = ServeProcess(server.settings, log_path)
    try:
        error = proc.start_error(spec.search.ready_timeout_s)
        if error is not None:
            return _failed(result, proc, error)
        result.startup_s = time.monotonic() - started
        result.server_pids = proc.pids()
        log(f"  ready in {result.startup_s:.1f} s at {proc.url} ({result.num_cores} cores)")
        for workload in spec.workloads:
            _search_workload(result, proc, workload, spec.search, search, log)
            if not proc.is_running():
                return _failed(result, proc, f"server exited during {workload.name!r}")
        return result
    finally:
        result.killed_pids = proc.stop()
        if result.killed_pids:
            log(f"  WARNING: killed processes that outlived the server: {result.killed_pids}")


def _search_workload(
    result: ConfigurationResult,
    proc: ServeProcess,
    workload: WorkloadSpec,
    settings: SearchSettings,
    search: Search,
    log: Log,
) -> None:
    try:
        found = search(proc.url, workload, settings, result.num_cores)
    except Exception as e:  # one broken search must not end a sweep of many hours
        result.workload_errors[workload.name] = f"{type(e).__name__}: {e}"
        log(f"  {workload.name}: search failed: {type(e).__name__}: {e}")
        return
    result.searches[workload.name] = found
    log(
        f"  {workload.name}: goodput {'>= ' if found.is_lower_bound else ''}"
        f"{found.goodput:.3f} req/s, "
        f"{found.goodput / result.num_cores:.3f} per core ({len(found.probes)} probes)"
    )


def _failed(result: ConfigurationResult, proc: ServeProcess, error: str) -> ConfigurationResult:
    result.is_ok = False
    result.error = error
    result.log_tail = proc.log_tail()
    return result


def default_search(
    url: str, workload: WorkloadSpec, settings: SearchSettings, num_cores: int
) -> GoodputResult:
    """The goodput search of `bench/goodput.py` with the workload's requests."""
    from pdserve.bench import goodput, loadgen
    from pdserve.bench.workloads import get_workload

    w = get_workload(workload.name)
    # Enough distinct requests for every probe (each continues where the last stopped), so
    # none is sent twice and no probe is helped by the prefix cache of an earlier one.
    num_specs = goodput.specs_for_search(
        settings.num_requests, settings.min_duration_s, settings.start_rate, settings.max_probes
    )
    specs = list(w.sample(num_specs, settings.seed, None))
    slo = workload.slo or w.default_slo

    def show(probe: Probe, is_passing: bool) -> None:
        attained = 100 * (probe.summary.slo_attainment or 0.0)
        verdict = "pass" if is_passing else "fail"
        print(f"    rate {probe.rate:.3f} req/s: attainment {attained:.1f}% {verdict}", flush=True)

    return goodput.find_goodput(
        url,
        loadgen.fetch_model_id(url),
        specs,
        slo,
        num_requests=settings.num_requests,
        min_duration_s=settings.min_duration_s,
        endpoint="chat" if all(s.prompt is None for s in specs) else "completions",
        extra_body={"ignore_eos": True} if settings.ignore_eos else None,
        seed=settings.seed,
        progress=False,
        config={"workload": workload.name, "slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms},
        attainment=settings.attainment,
        start_rate=settings.start_rate,
        max_probes=settings.max_probes,
        rel_tol=settings.rel_tol,
        num_cores=num_cores,
        price_per_hour=settings.price_per_hour,
        on_probe=show,
    )


# ---- output ---------------------------------------------------------------------------


def format_ranking(sweep: SweepResult) -> str:
    return report.format_table(_ranking_rows(sweep), num_left=2)


def _ranking_rows(sweep: SweepResult) -> list[list[str]]:
    names = sweep.spec.workload_names()
    rows = [
        [
            "rank",
            "configuration",
            "cores",
            "goodput/core (geo-mean)",
            *(f"{w} req/s (/core)" for w in names),
            "status",
        ]
    ]
    for i, r in enumerate(sweep.ranking()):
        cells = []
        for w in names:
            s = r.searches.get(w)
            bound = ">=" if s is not None and s.is_lower_bound else ""
            per_core = f"({r.goodput_per_core(w):.3f})"
            cells.append("-" if s is None else f"{bound}{s.goodput:.3f} {per_core}")
        status = "ok"
        if not r.is_ok:
            status = "FAILED"
        elif r.workload_errors:
            status = "search failed: " + ", ".join(r.workload_errors)
        rows.append([str(i + 1), r.name, str(r.num_cores), f"{r.score(names):.3f}", *cells, status])
    return rows


def write_json(sweep: SweepResult, path: Path) -> Path:
    return report.write_json(path, sweep_to_dict(sweep))


def sweep_to_dict(sweep: SweepResult) -> dict[str, Any]:
    names = sweep.spec.workload_names()
    configurations = [
        {
            "name": r.name,
            "settings": r.settings,
            "num_cores": r.num_cores,
            "is_ok": r.is_ok,
            "error": r.error,
            "log_tail": r.log_tail,
            "score": r.score(names),
            "goodput_per_core": {w: r.goodput_per_core(w) for w in names},
            "searches": {w: goodput_to_dict(s) for w, s in r.searches.items()},
            "workload_errors": r.workload_errors,
            "startup_s": r.startup_s,
            "killed_pids": r.killed_pids,
        }
        for r in sweep.results
    ]
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "machine": report.machine_info(),
        "workloads": sweep.spec.workloads,
        "search": sweep.spec.search,
        "ranking": [r.name for r in sweep.ranking()],
        "configurations": configurations,
    }


def write_html(sweep: SweepResult, path: Path) -> Path:
    results = {
        f"{r.name}/{workload}": search
        for r in sweep.ranking()
        for workload, search in r.searches.items()
    }
    ranking = report.html_table(_ranking_rows(sweep))
    return report.write_goodput_html(
        path,
        results,
        title="pdserve bench sweep",
        extra_sections=[
            ("ranking", "Ranking by goodput per core", ranking),
            ("configurations", "Server configurations", _configurations_html(sweep)),
        ],
    )


def _configurations_html(sweep: SweepResult) -> str:
    rows: list[list[str]] = [["configuration", "settings", "start-up (s)", "status"]]
    failures = []
    for r in sweep.results:
        startup = "-" if r.startup_s is None else f"{r.startup_s:.1f}"
        rows.append([r.name, json.dumps(r.settings), startup, r.error or "ok"])
        if not r.is_ok:
            tail = html.escape("\n".join(r.log_tail))
            failures.append(f"<h3>{html.escape(r.name)}: log tail</h3>\n<pre>{tail}</pre>")
    return "\n".join([report.html_table(rows), *failures])


# ---- command line ---------------------------------------------------------------------


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep YAML: server configurations and workloads")
    parser.add_argument("--out", default=None, help="folder for results and the report")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = SweepSpec.load(Path(args.config))
    out_dir = Path(args.out or f"sweep-{Path(args.config).stem}")
    for server in spec.configurations:
        print(f"{server.name}: {server.settings} ({spec.num_cores(server)} cores)")
    if spec.phases:
        print(f"phases: {', '.join(p.label for p in spec.phases)}; search: {spec.search}")
    else:
        print(f"workloads: {', '.join(spec.workload_names())}; search: {spec.search}")
    if getattr(args, "dry_run", False):
        return 0
    # SIGTERM must unwind like Ctrl-C, so the server being measured is stopped too.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if spec.phases:  # one phase-shifting trace per configuration (bench/sweep_phases.py)
        from pdserve.bench import sweep_phases

        results = sweep_phases.run_phased_sweep(spec, out_dir)
        print("\n" + sweep_phases.format_ranking(results))
        print(f"wrote {out_dir / 'sweep.json'}")
        return 0 if any(r.is_ok for r in results) else 1
    sweep = run_sweep(spec, out_dir)
    print("\n" + format_ranking(sweep))
    write_json(sweep, out_dir / "sweep.json")
    write_html(sweep, out_dir / "sweep.html")
    print(f"wrote {out_dir / 'sweep.json'} and {out_dir / 'sweep.html'}")
    return 0 if any(r.is_ok for r in sweep.results) else 1
