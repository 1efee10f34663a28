"""`pdserve sim` against the headline sweep of docs/benchmarks.md (real, measured).

The headline sweep (`pdserve bench sweep benchmarks/sweeps/headline.yaml`) ran on a Zen 4
host of this machine's kind with the machine to itself; its goodput per configuration and
workload, and the latencies at that rate, are copied below from docs/benchmarks.md. This
script runs the same goodput search (same SLOs, 40 requests and >= 20 s per probe, start
at 2 req/s, double then bisect to 20 % or 6 probes, ignore_eos) with the simulator as the
server, and the simulator at the real goodput rate for the latencies, and prints the
errors. Then it asks `pdserve plan`'s search which configuration is best per workload.

    python benchmarks/sim_vs_headline.py --profile PROFILE.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import common  # noqa: F401  (sys.path, like every benchmark)
import yaml

HEADLINE = Path(__file__).with_name("sweeps") / "headline.yaml"
# docs/benchmarks.md, "Current engine" table (2026-11-28, commit 264b6f2): goodput req/s,
# TTFT p99, TPOT p50, TPOT p99 (ms) at that rate.
MEASURED = {
    ("aggregated", "code"): (14, 137, 25.6, 38.8),
    ("aggregated", "chat"): (6, 947, 65.9, 100.2),
    ("aggregated", "summarize"): (0.875, 2375, 40.2, 93.4),
    ("aggregated", "random:in=1024,out=128"): (1.25, 1376, 36.6, 48.3),
    ("aggregated-2x1", "code"): (16, 152, 26.4, 39.1),
    ("aggregated-2x1", "chat"): (7, 941, 62.1, 86.9),
    ("aggregated-2x1", "summarize"): (0.875, 2693, 30.3, 83.1),
    ("aggregated-2x1", "random:in=1024,out=128"): (1.25, 1335, 33.0, 45.2),
    ("disaggregated", "code"): (14, 414, 22.8, 35.9),
    ("disaggregated", "chat"): (6, 2046, 48.0, 65.6),
    ("disaggregated", "summarize"): (0.625, 5136, 20.6, 26.3),
    ("disaggregated", "random:in=1024,out=128"): (2, 5023, 18.4, 21.3),
    ("auto", "code"): (16, 418, 21.9, 31.6),
    ("auto", "chat"): (7, 1993, 67.0, 93.7),
    ("auto", "summarize"): (1.125, 5703, 19.1, 32.5),
    ("auto", "random:in=1024,out=128"): (2.25, 5433, 24.9, 36.2),
}


def load_sweep() -> tuple[dict[str, dict], dict[str, object], dict]:
    from pdserve.bench.types import SLO
    from pdserve.bench.workloads import get_workload

    data = yaml.safe_load(HEADLINE.read_text())
    configs = {c.pop("name"): c for c in data["configurations"]}
    slos = {}
    for w in data["workloads"]:
        name = w if isinstance(w, str) else w["name"]
        slo = get_workload(name).default_slo
        if not isinstance(w, str) and w.get("slo"):
            slo = SLO(w["slo"]["ttft_ms"], w["slo"]["tpot_ms"])
        slos[name] = slo
    return configs, slos, data["search"]


def sim_goodput(serve, profile, workload: str, slo, search: dict):
    from pdserve.bench.goodput import search_goodput, specs_for_search
    from pdserve.bench.loadgen import Arrival
    from pdserve.bench.workloads import get_workload
    from pdserve.sim.run import simulate

    n, min_s = search["num_requests"], search["min_duration_s"]
    specs = get_workload(workload).sample(
        specs_for_search(n, min_s, search["start_rate"], search["max_probes"]), search["seed"]
    )

    def run_at_rate(rate: float):
        count = max(n, math.ceil(rate * min_s))
        return simulate(serve, profile, specs, Arrival.poisson(rate), num_requests=count)

    result = search_goodput(
        run_at_rate,
        slo,
        attainment=search["attainment"],
        start_rate=search["start_rate"],
        max_probes=search["max_probes"],
        rel_tol=search["rel_tol"],
    )
    return result, run_at_rate


def err(sim: float, real: float) -> str:
    return f"{100 * (sim / real - 1):+.0f}%" if real else "-"


def main(argv: list[str] | None = None) -> int:
    from pdserve.bench import metrics
    from pdserve.serve import ServeConfig
    from pdserve.sim.profile import Profile, format_profile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", required=True)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--only", default=None, help="configuration names, comma-separated")
    p.add_argument("--workloads", default=None, help="workload names, comma-separated")
    p.add_argument("--contention", type=float, default=None, help="override the profile's")
    p.add_argument("--compute-contention", type=float, default=None, help="override it too")
    p.add_argument("--frontend-per-request", type=float, default=None, help="CPU s (override)")
    p.add_argument("--frontend-per-token", type=float, default=None, help="CPU s (override)")
    args = p.parse_args(argv)
    profile = Profile.load(args.profile)
    overrides = {
        "contention": args.contention,
        "compute_contention": args.compute_contention,
        "frontend_s_per_request": args.frontend_per_request,
        "frontend_s_per_token": args.frontend_per_token,
    }
    profile = dataclasses.replace(profile, **{k: v for k, v in overrides.items() if v is not None})
    print(format_profile(profile))
    configs, slos, search = load_sweep()
    rows, best = [], {}
    print("| configuration | workload | goodput real / sim | TTFT p99 | TPOT p50 | TPOT p99 |")
    print("|---|---|---|---|---|---|")
    for (name, workload), (goodput, ttft99, tpot50, tpot99) in MEASURED.items():
        if args.only and name not in args.only.split(","):
            continue
        if args.workloads and workload not in args.workloads.split(","):
            continue
        serve = ServeConfig.from_dict(configs[name])
        start = time.perf_counter()
        result, run_at_rate = sim_goodput(serve, profile, workload, slos[workload], search)
        s = metrics.summarize(run_at_rate(goodput), slos[workload])
        if s.tpot_ms is None:  # nothing met the SLO shape (all failed)
            continue
        wall = time.perf_counter() - start
        sim = (result.goodput, s.ttft_ms.p99, s.tpot_ms.p50, s.tpot_ms.p99)
        cells = [
            f"{r:g} / {x:.3g} ({err(x, r)})"
            for r, x in zip((goodput, ttft99, tpot50, tpot99), sim, strict=True)
        ]
        print(f"| {name} | {workload} | " + " | ".join(cells) + f" |  ({wall:.1f} s)", flush=True)
        rows.append(
            {
                "configuration": name,
                "workload": workload,
                "real": [goodput, ttft99, tpot50, tpot99],
                "sim": list(sim),
                "sim_wall_s": wall,
            }
        )
        best.setdefault(workload, []).append((result.goodput, goodput, name))
    print("\nbest configuration per workload (simulated pick vs measured best):")
    for workload, entries in best.items():
        sim_pick = max(entries, key=lambda e: e[0])
        real_best = max(e[1] for e in entries)
        print(
            f"  {workload}: sim picks {sim_pick[2]} (its real goodput {sim_pick[1]:g}, "
            f"the real best {real_best:g}: {err(sim_pick[1], real_best)})"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "profile": profile.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
