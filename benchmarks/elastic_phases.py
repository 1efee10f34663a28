"""Elastic P/D against static layouts on one phase-shifting trace (issue 15, part 5).

One `pdserve bench run --phases` load — by default `code` with a tight TTFT, then long
prompts with a tight TPOT (`benchmarks/phases/elastic-contrast.yaml`; the planner's SLO
classes are read from it) — against each configuration
of `CONFIGURATIONS`, each on a fresh `pdserve serve` (bench/launcher.py) of two
single-thread workers on the built-in model:

- `static-2m`: aggregated, 2 mixed workers;
- `static-pd`: disaggregated, 1 prefill + 1 decode;
- `auto`: auto, 1 prefill + 1 decode;
- `elastic-2m`, `elastic-pd`: auto with `--planner slo`, starting from either layout.

Per configuration it saves the run (`<out>/<name>.json`: records, per-phase table) and
the server's view of it: the role timeline (`/admin/workers`, polled every second), the
planner's decisions with their reasons (`/admin/planner`), and the switch and migration
counters of `/metrics`. `--summarize` prints the markdown tables of docs/benchmarks.md
from the saved files. Run one configuration per call under the shared lock:

    for c in static-2m static-pd auto elastic-2m elastic-pd; do
      flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/elastic_phases.py --only $c --out elastic/
    done
    .venv/bin/python benchmarks/elastic_phases.py --summarize --out elastic/

`--warm-rates` first computes the planner's simulated rates for the trace's mixes into
its cache file (`planner_rates_cache`), niced and outside the lock: a cache miss during a
run costs minutes of simulation on a busy 2-core host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ADMIN_KEY = "elastic-bench"
DEFAULT = "default"
PROFILE = Path(os.environ.get("ELASTIC_PROFILE", REPO / "benchmarks/profiles/zen4-full.json"))
PHASES = REPO / "benchmarks/phases/elastic-contrast.yaml"
ENGINE = {"max_num_batched_tokens": 512, "kv_cache_memory_gib": 0.5}
# A worker whose engine loop is silent for worker_lease_s is declared dead and its
# requests move; on a busy shared host one step can take seconds, so the lease is long.
BASE = {
    "threads_per_worker": 1,
    "admin_key": ADMIN_KEY,
    "log_level": "INFO",
    "worker_lease_s": 30.0,
    "engine": ENGINE,
}
PLANNER = {
    "planner": "slo",
    "planner_profile": str(PROFILE),
    # The SLOs: the default class's and one class per phase naming an `slo_class`, taken
    # from the phases file (`planner_slos`).
    "slo_ttft_ms": 1500.0,
    "slo_tpot_ms": 100.0,
    "slo_classes": {},
    "planner_rates_cache": None,  # <out>/rates.json
    "planner_interval_s": 5.0,
    "planner_cooldown_s": 20.0,
}
CONFIGURATIONS = {
    "static-2m": {"mode": "aggregated", "mixed_workers": 2},
    "static-pd": {"mode": "disaggregated", "prefill_workers": 1, "decode_workers": 1},
    "auto": {"mode": "auto", "prefill_workers": 1, "decode_workers": 1},
    "elastic-2m": {"mode": "auto", "mixed_workers": 2, "prefill_workers": 0, "decode_workers": 0},
    "elastic-pd": {"mode": "auto", "prefill_workers": 1, "decode_workers": 1},
}


def get_json(url: str, path: str) -> dict:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def metric_sum(text: str, name: str) -> dict[str, float]:
    """Every sample of a counter `name`, by its label string."""
    out = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:_total)?(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match:
            out[match.group(1) or ""] = float(match.group(2))
    return out


class RolePoller(threading.Thread):
    """Polls `/admin/workers` every second: the role timeline of the run."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.start_s = url, time.perf_counter()
        self.timeline: list[tuple[float, dict[str, str]]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                workers = get_json(self.url, "/admin/workers")["workers"]
            except OSError:
                continue
            roles = {w["worker_id"]: w["role"] for w in workers}
            if not self.timeline or self.timeline[-1][1] != roles:
                self.timeline.append((round(time.perf_counter() - self.start_s, 1), roles))


def planner_slos(phases_path: Path) -> None:
    """The planner's SLOs from the trace: each phase that names an `slo_class` makes that
    class with the phase's SLO, a phase that names none sets the default class's; so the
    planner plans against the targets the run is scored by."""
    from pdserve.bench import phases

    steps, seed = phases.load_phases(phases_path)
    load = phases.build_load(steps, seed or 0)
    classes = {}
    for phase, slo in zip(load.phases, load.slos, strict=True):
        name = dict(phase.extra_body).get("slo_class")
        if name is None:
            PLANNER["slo_ttft_ms"], PLANNER["slo_tpot_ms"] = slo.ttft_ms, slo.tpot_ms
        else:
            classes[name] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}
    PLANNER["slo_classes"] = classes


def run_one(name: str, out: Path, phases_path: Path) -> None:
    from pdserve.bench import loadgen, metrics, phases
    from pdserve.bench.launcher import ServeProcess

    settings = BASE | CONFIGURATIONS[name] | (PLANNER if name.startswith("elastic") else {})
    steps, seed = phases.load_phases(phases_path)
    load = phases.build_load(steps, seed or 0)
    out.mkdir(parents=True, exist_ok=True)
    proc = ServeProcess(settings, out / f"{name}.log")
    try:
        if not proc.wait_ready(300):
            raise SystemExit(f"{name}: server not ready; see {out / f'{name}.log'}")
        model = loadgen.fetch_model_id(proc.url)
        poller = RolePoller(proc.url)
        poller.start()
        config = {"label": name, "settings": settings, "phases": phases.phases_config(load)}
        result = loadgen.run_benchmark_sync(
            proc.url,
            model,
            load.specs,
            loadgen.Arrival.trace(),
            extra_body={"ignore_eos": True},
            seed=seed or 0,
            progress=False,
            config=config,
        )
        poller.stopped.set()
        parts = phases.summarize_phases(result)
        print(f"{name}\n{phases.format_phases(parts)}", flush=True)
        text = urllib.request.urlopen(proc.url + "/metrics", timeout=10).read().decode()
        planner = get_json(proc.url, "/admin/planner")
        try:  # each switch's requests finished on the worker / moved off it
            switches = get_json(proc.url, "/dashboard/data")["role_switches"]
        except (OSError, KeyError) as e:
            switches = [f"unavailable: {e}"]
        server = {
            "role_timeline": poller.timeline,
            "planner": planner,
            "switches": switches,
            "role_switches": metric_sum(text, "pdserve:role_switches"),
            "migrations": metric_sum(text, "pdserve:request_migrations"),
            # where prompts were prefilled (auto's local/remote rule), by reason
            "placements": metric_sum(text, "pdserve:prefill_placement"),
            "run_seconds": time.perf_counter() - poller.start_s,
        }
        data = json.loads(metrics.to_json(result, parts[-1].summary))
        data |= {"phases": phases.phases_to_dict(parts), "server": server}
        (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    finally:
        killed = proc.stop()
        if killed:
            print(f"WARNING: killed leftover processes {killed}", file=sys.stderr)


def measure_profile(path: Path) -> None:
    """`pdserve profile --quick` on one thread, plus the two-worker contention factors
    (`--quick` leaves them at 1.0): the planner's contention term needs them."""
    import subprocess

    from pdserve.sim.measure import _contention

    command = [sys.executable, "-m", "pdserve.cli", "profile", "--quick", "--threads", "1"]
    subprocess.run([*command, "--out", str(path)], check=True)
    (read, compute), _ = _contention(None, 3)
    data = json.loads(path.read_text())
    data |= {"contention": read, "compute_contention": compute}
    data["notes"] = [*data.get("notes", []), "contention measured by elastic_phases.py"]
    path.write_text(json.dumps(data, indent=1))
    print(f"contention: read x{read:.2f}, compute x{compute:.2f}", flush=True)


def warm_rates(cache: Path, phases_path: Path) -> None:
    """Compute the planner's simulated rates for the mixes this trace will show (each
    class's requests over a 20 s window, as `forecast` reads them) into `cache`, before
    any locked run: on this host a cache miss costs minutes of simulation."""
    from pdserve.bench import phases
    from pdserve.control.planner import Forecast, PlannerConfig
    from pdserve.control.slo_classes import parse_classes
    from pdserve.serve import ServeConfig
    from pdserve.sim.rates import SimRates
    from pdserve.sim.search import prompt_tokens

    serve = ServeConfig.from_dict(BASE | CONFIGURATIONS["elastic-pd"] | PLANNER)
    rates = SimRates(
        str(PLANNER["planner_profile"]),
        serve.threads(),
        serve.engine,
        in_subprocess=False,
        cache_path=str(cache),
    )
    config = PlannerConfig(
        PLANNER["slo_ttft_ms"],
        PLANNER["slo_tpot_ms"],
        classes=parse_classes(PLANNER["slo_classes"]),
    )
    steps, seed = phases.load_phases(phases_path)
    load = phases.build_load(steps, seed or 0)
    offset = 0
    wanted = {((0, 0), DEFAULT): Forecast(0.0, ())}  # the first pass, before any traffic
    for phase, count in zip(load.phases, load.counts, strict=True):
        specs = load.specs[offset : offset + count]
        offset += count
        name = config.class_of(dict(phase.extra_body).get("slo_class"))
        per_window = max(16, round(phase.rate * config.mix_window_s))
        for start in range(0, max(1, count - per_window + 1), max(1, per_window // 4)):
            mix = tuple((prompt_tokens(s), s.max_tokens) for s in specs[start : start + per_window])
            fc = Forecast(phase.rate, mix, (name,) * len(mix))
            wanted.setdefault((fc.signature, name), fc)
    for (signature, name), fc in wanted.items():
        started = time.perf_counter()
        found = rates(fc, config.for_class(name))
        print(f"{name} {signature}: {found} ({time.perf_counter() - started:.0f} s)", flush=True)


def summarize(out: Path) -> None:
    runs = {
        n: json.loads((out / f"{n}.json").read_text())
        for n in CONFIGURATIONS
        if (out / f"{n}.json").exists()
    }
    if not runs:
        raise SystemExit(f"no runs in {out}")
    names = [p["name"] for p in next(iter(runs.values()))["phases"]]
    print(
        "| configuration | "
        + " | ".join(f"{p} attain / goodput" for p in names)
        + " | errors | switches | migrations |"
    )
    print("|---" * (len(names) + 4) + "|")
    best = {p: max(r["phases"][i]["goodput"] for r in runs.values()) for i, p in enumerate(names)}
    for name, run in runs.items():
        cells = [f"{100 * p['attainment']:.0f}% / {p['goodput']:.2f}" for p in run["phases"]]
        errors = run["phases"][-1]["num_errors"]
        switches = sum(run["server"]["role_switches"].values())
        migrations = sum(run["server"]["migrations"].values())
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {errors} | {switches:.0f} | {migrations:.0f} |"
        )
    statics = [n for n in runs if not n.startswith("elastic")]
    for name in [n for n in runs if n.startswith("elastic")]:
        ratios = []
        for i, p in enumerate(names):
            top = max(runs[s]["phases"][i]["goodput"] for s in statics) if statics else best[p]
            mine = runs[name]["phases"][i]["goodput"]
            ratios.append(f"{p} {mine / top:.2f}x" if top > 0 else f"{p} {mine:.2f} vs 0")
        print(f"{name} vs best static: " + ", ".join(ratios))
        print_switches(runs[name]["server"])


def print_switches(server: dict) -> None:
    """Each switch at its time from the run's start, what its drain did to the requests
    on the worker, and the planner's reason for the move."""
    end = server["run_seconds"]
    for when, roles in server["role_timeline"]:
        print(f"  t={when:>6.1f}s roles {roles}")
    for s in server["switches"]:
        if isinstance(s, dict):
            print(
                f"  switch ended t={end - s['age_s']:.0f}s {s['worker_id']} {s['from']}->{s['to']}"
                f" in {s['seconds']} s: {s['num_finished']} finished, {s['num_migrated']} moved"
            )
    for d in server["planner"]["decisions"]:
        if d["moves"]:
            print(f"  planner t={end - d['age_s']:.0f}s: {d['reason']}; moves {d['moves']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=list(CONFIGURATIONS), action="append")
    parser.add_argument("--phases", type=Path, default=PHASES)
    parser.add_argument("--out", type=Path, default=Path("elastic-phases"))
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--warm-rates", action="store_true", help="fill the planner's cache")
    parser.add_argument(
        "--measure-profile", action="store_true", help="profile this host first, plan with it"
    )
    parser.add_argument(
        "--profile-only", action="store_true", help="with --measure-profile: only that"
    )
    args = parser.parse_args()
    if args.summarize:
        summarize(args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    planner_slos(args.phases)
    PLANNER["planner_rates_cache"] = str(args.out / "rates.json")
    if args.measure_profile or (args.out / "profile.json").is_file():
        PLANNER["planner_profile"] = str(args.out / "profile.json")  # this host's, measured
    if args.measure_profile:  # the planner's cost model, measured now (under the lock)
        measure_profile(Path(PLANNER["planner_profile"]))
        if args.profile_only:
            return
    if args.warm_rates or args.measure_profile:
        warm_rates(Path(PLANNER["planner_rates_cache"]), args.phases)
        if args.warm_rates:
            return
    for name in args.only or list(CONFIGURATIONS):
        run_one(name, args.out, args.phases)


if __name__ == "__main__":
    main()
