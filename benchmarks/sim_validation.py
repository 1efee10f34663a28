"""Simulated vs measured: `pdserve sim` against real `pdserve serve` runs on this machine.

For each case (a configuration of the headline sweep, a workload, a Poisson rate) the
script starts the real server, sends the workload with the load generator of `pdserve
bench run` (ignore_eos, seeded), stops it, and right after simulates the same requests,
arrivals and layout from a profile measured at the start of the run (`pdserve profile`,
full grid, 1 and 2 threads) — so model and machine are measured close together. It prints
TTFT/TPOT p50/p99, output throughput and goodput of both with the relative error
(sim / real - 1) and writes both runs as bench JSON (`pdserve bench compare` reads them).
On a shared host it simulates each case twice: on an idle machine, and with the 1-minute
load average read just before the server started as other programs' busy threads
(`--background-load`).

    python benchmarks/sim_validation.py [--profile FILE] [--out-dir DIR] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common  # noqa: F401  (sys.path and thread settings, like every benchmark)
import yaml

HEADLINE = Path(__file__).with_name("sweeps") / "headline.yaml"
# (configuration, workload, SLO override or None, rate req/s): near each configuration's
# goodput in the headline sweep, where the model's errors matter most.
CASES = (
    ("aggregated", "code", None, 8.0),
    ("aggregated", "chat", None, 4.0),
    ("aggregated", "summarize", None, 0.75),
    ("aggregated", "random:in=1024,out=128", (5000, 50), 1.0),
    ("aggregated-2x1", "code", None, 8.0),
    ("aggregated-2x1", "chat", None, 4.0),
    ("aggregated-2x1", "summarize", None, 0.75),
    ("aggregated-2x1", "random:in=1024,out=128", (5000, 50), 1.0),
    ("disaggregated", "code", None, 8.0),
    ("disaggregated", "chat", None, 4.0),
    ("disaggregated", "summarize", None, 0.75),
    ("disaggregated", "random:in=1024,out=128", (5000, 50), 1.5),
    ("auto", "code", None, 8.0),
    ("auto", "chat", None, 4.0),
    ("auto", "summarize", None, 0.75),
    ("auto", "random:in=1024,out=128", (5000, 50), 1.5),
)
MIN_DURATION_S = 20.0
SEED = 0


def runnable_weight(samples: int = 10, interval_s: float = 0.2) -> float:
    """Other programs' runnable threads, each weighted by its CFS share against a nice-0
    thread (1.25 ** -nice: a nice-15 test thread counts 0.035), averaged over a few
    samples: the background load the kernel's scheduler actually lets compete with the
    server's nice-0 processes (the load average counts every niced test thread as 1)."""
    me = os.getpid()
    total = 0.0
    for _ in range(samples):
        for task in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
            try:
                fields = task.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "R" and int(task.parent.parent.parent.name) != me:
                total += 1.25 ** -int(fields[16])
        time.sleep(interval_s)
    return total / samples


def _descendants(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    family, grew = {root}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in family} - family
        family |= new
        grew = bool(new)
    return family


class BackgroundSampler:
    """`runnable_weight` of every process outside this one's tree (the server, its
    workers and the client are ours), sampled every `interval_s` (a scan costs ~20-50 ms of this
    process's CPU, so not more often) while a real run
    goes: the trace `--replay-background` feeds the simulation (time 0: the start)."""

    def __init__(self, interval_s: float = 2.0) -> None:
        import threading

        self.interval_s = interval_s
        self.trace: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundSampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            ours = _descendants(os.getpid())
            total = 0.0
            for task in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
                try:
                    fields = task.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] == "R" and int(task.parent.parent.parent.name) not in ours:
                    total += 1.25 ** -int(fields[16])
            self.trace.append((round(time.monotonic() - self._start, 3), round(total, 3)))
            self._stop.wait(self.interval_s)


def configurations() -> dict[str, dict]:
    data = yaml.safe_load(HEADLINE.read_text())
    return {c.pop("name"): c for c in data["configurations"]}


def real_run(settings: dict, specs, slo, rate: float, num_requests: int, log_dir: Path, steps=None):
    """One real run; with `steps` (a folder) every worker logs its engine steps there
    (`PDSERVE_STEP_LOG`, engine/step_log.py)."""
    from pdserve.bench import loadgen
    from pdserve.bench.launcher import ServeProcess
    from pdserve.engine.step_log import ENV

    if steps is not None:
        os.environ[ENV] = str(steps)
    proc = ServeProcess(settings, log_dir / "serve.log")
    os.environ.pop(ENV, None)
    try:
        if not proc.wait_ready(300):
            raise RuntimeError(f"server not ready: {proc.log_tail()[-5:]}")
        return loadgen.run_benchmark_sync(
            proc.url,
            loadgen.fetch_model_id(proc.url),
            specs,
            loadgen.Arrival.poisson(rate),
            num_requests=num_requests,
            endpoint="completions",
            extra_body={"ignore_eos": True},
            seed=SEED,
            progress=False,
            config=_config(slo),
        )
    finally:
        proc.stop()


def sim_run(
    settings: dict,
    profile,
    specs,
    slo,
    rate: float,
    num_requests: int,
    load=0.0,
    host=None,
    trace=(),
):
    from pdserve.bench.loadgen import Arrival
    from pdserve.serve import ServeConfig
    from pdserve.sim.run import simulate

    serve = ServeConfig.from_dict(settings)
    return simulate(
        serve,
        profile,
        specs,
        Arrival.poisson(rate),
        num_requests=num_requests,
        seed=SEED,
        config=_config(slo),
        background_load=load,
        host_slowdown=host,
        background_trace=trace,
    )


def _override(profile, args):
    import dataclasses

    changes = {
        "contention": args.contention,
        "compute_contention": args.compute_contention,
        "frontend_s_per_request": args.frontend_per_request,
        "frontend_s_per_token": args.frontend_per_token,
        "frontend_s_per_step": args.frontend_per_step,
    }
    if args.receive_per_request is not None:
        changes["receive_s_per_request"] = args.receive_per_request
        changes["receive_s_per_block"] = args.receive_per_block or 0.0
    if args.contention_from_steps:
        from pdserve.engine.step_log import read_step_log
        from pdserve.sim.profile import Profile
        from pdserve.sim.step_log_fit import contention_from_logs

        folder = Path(args.contention_from_steps)
        runs = [read_step_log(d) for d in sorted(folder.glob("*_steps"))]
        runs = [logs for logs in runs if len(logs) >= 2]  # only runs of two workers overlap
        # Priced with the profile of their own time when the folder has one (a host's
        # speed moves over hours: another time's profile would read as contention).
        own = folder / "profile.json"
        read, compute = contention_from_logs(runs, Profile.load(own) if own.exists() else profile)
        print(
            f"contention in situ from {len(runs)} runs' step logs: x{read:.2f} read, "
            f"x{compute:.2f} compute",
            flush=True,
        )
        changes["contention"], changes["compute_contention"] = read, compute
        changes["contention_curve"] = ()  # a curve would replace the two factors
    if args.contention_curve_from:
        from pdserve.sim.measure import fit_contention_curve
        from pdserve.sim.profile import Profile

        paths = args.contention_curve_from.split(",")
        runs = [Profile.load(path).checks.get("contention") for path in paths]
        changes["contention_curve"] = fit_contention_curve(runs)
    return dataclasses.replace(profile, **{k: v for k, v in changes.items() if v is not None})


def _config(slo) -> dict:
    return {"slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms}


def row(summary) -> dict:
    return {
        "ttft_p50": summary.ttft_ms.p50,
        "ttft_p99": summary.ttft_ms.p99,
        "tpot_p50": summary.tpot_ms.p50 if summary.tpot_ms else None,
        "tpot_p99": summary.tpot_ms.p99 if summary.tpot_ms else None,
        "throughput": summary.output_throughput,
        "goodput": summary.goodput,
    }


def error(sim: float | None, real: float | None) -> str:
    if sim is None or real is None or real == 0:
        return "-"
    return f"{100 * (sim / real - 1):+.0f}%"


def main(argv: list[str] | None = None) -> int:
    from pdserve.bench import metrics
    from pdserve.bench.types import SLO
    from pdserve.bench.workloads import get_workload
    from pdserve.sim.measure import measure_profile
    from pdserve.sim.profile import Profile, format_profile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=None, help="default: measure one now (full grid)")
    p.add_argument(
        "--profile-each",
        action="store_true",
        help="re-measure a --quick profile right before each configuration's runs (a "
        "shared, noisy machine: the model then sees the load the real run sees)",
    )
    p.add_argument("--out-dir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--only", default=None, help="configuration names, comma-separated")
    p.add_argument("--workloads", default=None, help="workload names, comma-separated")
    p.add_argument(
        "--resim",
        action="store_true",
        help="no real runs: re-simulate against the real runs already in --out-dir",
    )
    p.add_argument("--contention", type=float, default=None, help="override the profile's")
    p.add_argument("--compute-contention", type=float, default=None, help="override it too")
    p.add_argument("--frontend-per-request", type=float, default=None, help="CPU s (override)")
    p.add_argument("--frontend-per-token", type=float, default=None, help="CPU s (override)")
    p.add_argument(
        "--frontend-per-step", type=float, default=None, help="CPU s per step message (override)"
    )
    p.add_argument(
        "--contention-from-steps",
        default=None,
        help="a folder of earlier runs' <case>_steps/ logs (--step-log): fit both contention "
        "factors in situ from them (sim/step_log_fit.py; priced with that folder's "
        "profile.json when it has one) and use them instead of the profile's (and of "
        "--contention / --compute-contention)",
    )
    p.add_argument(
        "--contention-curve-from",
        default=None,
        help="profiles (comma-separated) whose contention runs give the curve by step size",
    )
    p.add_argument("--receive-per-request", type=float, default=None, help="s (override)")
    p.add_argument("--receive-per-block", type=float, default=None, help="s (override)")
    p.add_argument(
        "--weighted-background",
        action="store_true",
        help="the loaded simulation takes the runnable threads weighted by nice "
        "(runnable_weight) instead of the 1-minute load average",
    )
    p.add_argument(
        "--step-log",
        action="store_true",
        help="the real workers log every engine step into --out-dir/<case>_steps/ "
        "(benchmarks/step_log_compare.py prices them with a profile)",
    )
    p.add_argument(
        "--replay-host",
        action="store_true",
        help="also simulate each case with its real run's host slowdown replayed "
        "(from --out-dir/<case>_steps/, sim/host_trace.py): the result's sim_replayed",
    )
    p.add_argument(
        "--replay-background",
        action="store_true",
        help="also simulate each case with the other programs' load sampled during its "
        "real run (meta background_trace) as a changing background_load: "
        "the result's sim_background_trace",
    )
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.resim and (args.out_dir is None or not args.profile):
        p.error("--resim needs --out-dir (with the real runs) and --profile")
    if args.out_dir is None:
        import tempfile

        args.out_dir = Path(tempfile.mkdtemp(prefix="pdserve-sim-validation-"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"runs and profiles in {args.out_dir}", flush=True)
    profile = None
    if args.profile:
        profile = Profile.load(args.profile)
    elif not args.profile_each:
        profile = measure_profile([1, 2])
        profile.save(args.out_dir / "profile.json")
    if profile is not None:
        profile = _override(profile, args)
        print(format_profile(profile), flush=True)
    configs = configurations()
    results = []
    measured_for = None
    for name, workload_name, slo_override, rate in CASES:
        if args.only and name not in args.only.split(","):
            continue
        if args.workloads and workload_name.split(":")[0] not in args.workloads.split(","):
            continue
        if args.profile_each and measured_for != name:
            threads = configs[name].get("threads_per_worker", 1)
            profile = measure_profile([threads], quick=True, log=lambda *a: None)
            profile.save(args.out_dir / f"profile_{name}.json")
            measured_for = name
        workload = get_workload(workload_name)
        slo = SLO(*slo_override) if slo_override else workload.default_slo
        num_requests = max(20, min(160, int(rate * MIN_DURATION_S)))
        specs = workload.sample(num_requests, SEED)
        tag = f"{name}_{workload_name.split(':')[0]}"
        meta_path = args.out_dir / f"{tag}_meta.json"
        if args.resim:
            if not meta_path.exists():
                print(f"| {name} | {workload_name} | no real run in {args.out_dir} |")
                continue
            meta = json.loads(meta_path.read_text())
            real = metrics.from_json((args.out_dir / f"{tag}_real.json").read_text())
        else:
            meta = {
                "at": time.strftime("%H:%M:%S"),
                # before our server starts: the other programs' load
                "background_load": float(Path("/proc/loadavg").read_text().split()[0]),
                "background_weighted": runnable_weight(),
            }
            steps = args.out_dir / f"{tag}_steps" if args.step_log else None
            with BackgroundSampler() as sampler:
                real = real_run(configs[name], specs, slo, rate, num_requests, args.out_dir, steps)
            meta["background_trace"] = sampler.trace
            meta["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
            meta_path.write_text(json.dumps(meta) + "\n")
        started = meta["at"]
        background = meta.get(
            "background_weighted" if args.weighted_background else "background_load", 0.0
        )
        sim = sim_run(configs[name], profile, specs, slo, rate, num_requests)
        loaded = sim_run(configs[name], profile, specs, slo, rate, num_requests, background)
        replayed = None
        if args.replay_host and (args.out_dir / f"{tag}_steps").is_dir():
            from pdserve.engine.step_log import read_step_log
            from pdserve.sim.host_trace import from_step_logs

            host = from_step_logs(read_step_log(args.out_dir / f"{tag}_steps"), profile)
            run = sim_run(configs[name], profile, specs, slo, rate, num_requests, host=host)
            replayed = row(metrics.summarize(run, slo))
        traced = None
        if args.replay_background and meta.get("background_trace"):
            run = sim_run(
                configs[name],
                profile,
                specs,
                slo,
                rate,
                num_requests,
                trace=[tuple(x) for x in meta["background_trace"]],
            )
            traced = row(metrics.summarize(run, slo))
        for kind, run in (("real", real), ("sim", sim)) if not args.resim else (("sim", sim),):
            text = metrics.to_json(run, metrics.summarize(run, slo))
            (args.out_dir / f"{tag}_{kind}.json").write_text(text + "\n")
        r, s = row(metrics.summarize(real, slo)), row(metrics.summarize(sim, slo))
        b = row(metrics.summarize(loaded, slo))
        results.append(
            {
                "case": [name, workload_name, rate],
                "at": started,
                "background_load": background,
                "meta": meta,
                "real": r,
                "sim": s,
                "sim_with_background": b,
                "sim_replayed": replayed,
                "sim_background_trace": traced,
            }
        )
        cells = " | ".join(
            f"{r[k]:.1f} / {s[k]:.1f} ({error(s[k], r[k])}) / {b[k]:.1f} ({error(b[k], r[k])})"
            for k in r
        )
        print(f"| {name} | {workload_name} | {rate:g} | {background:.1f} | {cells} |", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"profile": profile.to_dict(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
