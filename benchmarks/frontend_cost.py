"""CPU time the front end spends per request and per token: the router process (HTTP,
tokenising, detokenising, SSE) and the benchmark client (`pdserve bench`'s load
generator), which share the machine's cores with the workers.

One `pdserve serve` (aggregated, one 1-thread worker) takes three loads of 40 s each with
the same prompts: short and long outputs at low rates (about one request decoding at a
time: a step message per token) and long outputs at a rate that batches ~6 requests per
step. The CPU seconds of the router process (its own, not its workers': /proc/PID/stat
utime + stime) and of this process (the client) over each load, minus the router's idle
CPU per second measured before, are solved (least squares) for the router's seconds per
request, per output token and per step message its worker sent (counted from the
worker's step log: one message per step that sampled), and the client's the same way (a
step's tokens wake it once): the profile's `frontend_s_per_request`, `frontend_s_per_token` and
`frontend_s_per_step`. Without the third load a step message and a token cannot be told
apart, and the per-token figure carried the message's cost: on the Intel host 0.78 ms
per token, which made every simulated batch of 5 pay five messages' CPU. CPU time,
unlike wall time, is barely changed by other programs on a shared host, so this may run
niced; the rates are low so that a loaded host still serves them.

    nice -n 10 python benchmarks/frontend_cost.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
LOADS = (("random:in=64,out=16", 2.0), ("random:in=64,out=96", 0.5), ("random:in=64,out=96", 3.0))
DURATION_S = 40.0
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def step_messages(folder: Path, began: float, ended: float) -> int:
    """Step messages the worker sent the router between two wall-clock times: its logged
    steps that sampled a token (engine/step_log.py; a chunk of a prompt sends nothing)."""
    from pdserve.engine.step_log import read_step_log

    logs = read_step_log(folder) if folder.is_dir() else {}
    return sum(
        1
        for rows in logs.values()
        for row in rows
        if row.get("sampled", 0) > 0 and began <= row["t"] <= ended
    )


def solve(rows: list[dict]) -> dict[str, float]:
    """Least squares over the loads: the router's and the client's CPU per request, per
    token and per step message. The client sees no messages, but a step's tokens reach
    it together, one wake-up of its event loop for all of them (measured on the Intel
    host: 120 requests of 96 tokens cost it 2.9x what 20 did, not 6x)."""
    import numpy as np

    x = np.array([[r["requests"], r["tokens"], r["step_messages"]] for r in rows], dtype=float)
    out = {}
    for who in ("router", "client"):
        y = np.array([r[f"{who}_cpu_s"] for r in rows])
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        for name, value in zip(("request", "token", "step"), coef, strict=True):
            out[f"{who}_s_per_{name}"] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    from pdserve.bench import loadgen
    from pdserve.bench.launcher import ServeProcess
    from pdserve.bench.workloads import get_workload
    from pdserve.engine.step_log import ENV as STEP_LOG_ENV

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    steps_dir = Path(tempfile.mkdtemp(prefix="pdserve-frontend-steps-"))
    os.environ[STEP_LOG_ENV] = str(steps_dir)  # the worker logs every step there
    proc = ServeProcess(SETTINGS)
    os.environ.pop(STEP_LOG_ENV, None)
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
            began = time.time()
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
                    "span": (began, time.time()),
                    "wall_s": wall,
                    "router_cpu_s": router,
                    "client_cpu_s": client,
                }
            )
            print(rows[-1], flush=True)
    finally:
        proc.stop()  # the worker writes the rest of its step log as it closes
    for row in rows:
        row["step_messages"] = step_messages(steps_dir, *row.pop("span"))
        print(f"{row['workload']}: {row['step_messages']} step messages", flush=True)
    out = {"idle_router_cpu_per_s": idle_per_s, "loads": rows}
    out.update(solve(rows))
    for who in ("router", "client"):
        print(
            f"{who}: {out[f'{who}_s_per_request'] * 1e3:.2f} ms per request, "
            f"{out[f'{who}_s_per_token'] * 1e6:.0f} us per output token, "
            f"{out[f'{who}_s_per_step'] * 1e6:.0f} us per step message"
        )
    print(f"router idle: {idle_per_s * 1e3:.1f} ms of CPU per s")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
