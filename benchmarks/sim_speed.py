"""How fast `pdserve sim` runs: simulated seconds per wall second, per headline cell.

For each configuration and workload of the headline sweep (benchmarks/sweeps/headline.yaml)
it simulates a Poisson load at that cell's measured goodput (docs/benchmarks.md, the rate
the goodput search spends most of its time near) for `--sim-seconds` of arrivals, and
reports the simulated span, the wall and CPU time of `simulate()` (set-up included), and
simulated seconds per CPU second (on a shared host the wall time mostly measures the other
programs; this process is single-threaded, so on an idle host CPU time is wall time). The
best of `--repeats` runs (a shared host only ever slows a run down).

    python benchmarks/sim_speed.py --profile benchmarks/profiles/zen4-shared-quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADLINE = Path(__file__).with_name("sweeps") / "headline.yaml"
# The measured goodput (req/s) of each cell, docs/benchmarks.md's headline table.
RATES = {
    ("aggregated", "code"): 14,
    ("aggregated", "chat"): 6,
    ("aggregated", "summarize"): 0.875,
    ("aggregated", "random:in=1024,out=128"): 1.25,
    ("aggregated-2x1", "code"): 16,
    ("aggregated-2x1", "chat"): 7,
    ("aggregated-2x1", "summarize"): 0.875,
    ("aggregated-2x1", "random:in=1024,out=128"): 1.25,
    ("disaggregated", "code"): 14,
    ("disaggregated", "chat"): 6,
    ("disaggregated", "summarize"): 0.625,
    ("disaggregated", "random:in=1024,out=128"): 2,
    ("auto", "code"): 16,
    ("auto", "chat"): 7,
    ("auto", "summarize"): 1.125,
    ("auto", "random:in=1024,out=128"): 2.25,
}


def configurations() -> dict[str, dict]:
    import yaml

    data = yaml.safe_load(HEADLINE.read_text())
    return {c.pop("name"): c for c in data["configurations"]}


def time_cell(serve, profile, workload: str, rate: float, sim_seconds: float, repeats: int):
    from pdserve.bench.loadgen import Arrival
    from pdserve.bench.workloads import get_workload
    from pdserve.sim.run import simulate

    count = max(40, math.ceil(rate * sim_seconds))
    specs = get_workload(workload).sample(count, 0)
    best = None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        result = simulate(serve, profile, specs, Arrival.poisson(rate), num_requests=count)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if best is None or cpu < best[2]:
            best = (result.duration_s, wall, cpu, count)
    return best


def main(argv: list[str] | None = None) -> int:
    from pdserve.serve import ServeConfig
    from pdserve.sim.profile import Profile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", required=True)
    p.add_argument("--sim-seconds", type=float, default=60.0, help="arrivals span (s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=None, help="configuration names, comma-separated")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    profile = Profile.load(args.profile)
    configs = configurations()
    rows = []
    print("| configuration | workload | rate | requests | simulated s | wall s | CPU s | speed |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, workload), rate in RATES.items():
        if args.only and name not in args.only.split(","):
            continue
        serve = ServeConfig.from_dict(configs[name])
        simulated, wall, cpu, count = time_cell(
            serve, profile, workload, rate, args.sim_seconds, args.repeats
        )
        speed = simulated / cpu
        print(
            f"| {name} | {workload} | {rate:g} | {count} | {simulated:.1f} | {wall:.3f} "
            f"| {cpu:.3f} | {speed:.0f}x |",
            flush=True,
        )
        rows.append([name, workload, rate, count, simulated, wall, cpu, speed])
    speeds = sorted(r[-1] for r in rows)
    if speeds:
        print(f"speed: min {speeds[0]:.0f}x, median {speeds[len(speeds) // 2]:.0f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
