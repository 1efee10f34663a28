"""CPU time the front end spends per request and per token: the router process (HTTP,
tokenising, detokenising, SSE) and the benchmark client (`pdserve bench`'s load
generator), which share the machine's cores with the workers.

One `pdserve serve` (aggregated, one 1-thread worker) takes two loads of 40 s each with
the same prompts and different output lengths; the CPU seconds of the router process
(its own, not its workers': /proc/PID/stat utime + stime) and of this process (the
client) over each load, minus the router's idle CPU per second measured before, are
solved for seconds per request and seconds per output token: the profile's
`frontend_s_per_request` and `frontend_s_per_token` (router + client). CPU time, unlike
wall time, is barely changed by other programs on a shared host, so this runs niced and
without the benchmark lock; the rates are low so that a loaded host still serves them.

    nice -n 10 python benchmarks/frontend_cost.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common  # noqa: F401  (sys.path and thread settings, like every benchmark)

SETTINGS = {
    "mode": "aggregated",
    "mixed_workers": 1,
    "threads_per_worker": 1,
    "engine": {"kv_cache_memory_gib": 0.5},
    "worker_lease_s": 60.0,  # a loaded host can stall a niced worker for seconds
}
LOADS = (("random:in=64,out=16", 2.0), ("random:in=64,out=96", 0.5))
DURATION_S = 40.0
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def main(argv: list[str] | None = None) -> int:
    from pdserve.bench import loadgen
    from pdserve.bench.launcher import ServeProcess
    from pdserve.bench.workloads import get_workload

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    proc = ServeProcess(SETTINGS)
    rows = []
    try:
        if not proc.wait_ready(300):
            raise RuntimeError(f"server not ready: {proc.log_tail()[-5:]}")
        pid = proc.proc.pid
        model = loadgen.fetch_model_id(proc.url)
        start, idle0 = time.perf_counter(), cpu_s(pid)
        time.sleep(5.0)
        idle_per_s = (cpu_s(pid) - idle0) / (time.perf_counter() - start)
        for workload, rate in LOADS:
            n = int(rate * DURATION_S)
            specs = get_workload(workload).sample(n, 0)
            router0, client0, wall0 = cpu_s(pid), time.process_time(), time.perf_counter()
            result = loadgen.run_benchmark_sync(
                proc.url,
                model,
                specs,
                loadgen.Arrival.poisson(rate),
                num_requests=n,
                endpoint="completions",
                extra_body={"ignore_eos": True},
                seed=0,
                progress=False,
            )
            wall = time.perf_counter() - wall0
            router = cpu_s(pid) - router0 - idle_per_s * wall
            client = time.process_time() - client0
            ok = [r for r in result.records if r.is_ok]
            errors = {r.error for r in result.records if not r.is_ok}
            if errors:
                print(f"{len(result.records) - len(ok)} failed: {sorted(errors)[:3]}", flush=True)
            tokens = sum(r.num_output_tokens for r in ok)
            rows.append(
                {
                    "workload": workload,
                    "requests": len(ok),
                    "tokens": tokens,
                    "wall_s": wall,
                    "router_cpu_s": router,
                    "client_cpu_s": client,
                }
            )
            print(rows[-1], flush=True)
    finally:
        proc.stop()
    (a1, b1), (a2, b2) = [(r["requests"], r["tokens"]) for r in rows]
    det = a1 * b2 - a2 * b1
    out = {"idle_router_cpu_per_s": idle_per_s, "loads": rows}
    for who in ("router", "client"):
        c1, c2 = rows[0][f"{who}_cpu_s"], rows[1][f"{who}_cpu_s"]
        out[f"{who}_s_per_request"] = (c1 * b2 - c2 * b1) / det
        out[f"{who}_s_per_token"] = (a1 * c2 - a2 * c1) / det
        print(
            f"{who}: {out[f'{who}_s_per_request'] * 1e3:.2f} ms per request, "
            f"{out[f'{who}_s_per_token'] * 1e6:.0f} us per output token"
        )
    print(f"router idle: {idle_per_s * 1e3:.1f} ms of CPU per s")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
