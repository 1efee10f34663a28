"""What the Ray launcher costs: `pdserve serve` with `launcher: ray` vs local worker
processes, the same layout side by side in one run; and with the router itself in a Ray
actor (`router_on_ray`, layout `ray-router`).

Layout: disaggregated, one prefill and one decode worker, `--threads` each, the built-in
model. The Ray side runs on a one-node Ray cluster this script starts (and stops) with
`ray.cluster_utils.Cluster`, as an operator's `ray start --head` would run before `pdserve
serve --launcher ray --ray-address ...`; its start-up is not charged to pdserve. Both
layouts put P and D on one host, so KV goes over shared memory in both.

Per layout and round: start-up (process start to the "pdserve ready" line), then
`pdserve bench`'s load generator at concurrency `--concurrency` with a `random` workload
(`--input-tokens` in, `--output-tokens` out, ignore_eos), after `--warmup` unmeasured
requests: TTFT p50/p99, TPOT p50 and output throughput. Rounds alternate the layouts
(local, ray, ray-router, local, ...) so drift on a shared host hits each alike. The
router actor runs on the same host and binds 127.0.0.1 there, so the load generator
reaches it as it reaches the local router. Goal (issue 17): steady
state (TTFT p50, throughput) within 5 % of local.

    python benchmarks/ray_overhead.py [--rounds 2] [--num-requests 48] [--json-out F]
        [--layouts local,ray,ray-router]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import common

from pdserve.bench.launcher import ServeProcess
from pdserve.bench.loadgen import Arrival, fetch_model_id, run_benchmark_sync
from pdserve.bench.metrics import summarize
from pdserve.bench.workloads import get_workload

GOAL = 0.05


def settings(args, launcher: str, ray_address: str | None) -> dict:
    base = {
        "mode": "disaggregated",
        "prefill_workers": 1,
        "decode_workers": 1,
        "threads_per_worker": args.threads,
        "log_level": "WARNING",
        # A shared host can stall a worker for seconds: a long lease keeps such stalls from
        # fencing workers mid-run (they would cost both launchers alike, but add noise).
        "worker_lease_s": 30.0,
        "engine": {"max_num_seqs": args.concurrency, "num_kv_blocks": 1024},
    }
    if launcher in ("ray", "ray-router"):
        base |= {"launcher": "ray", "ray_address": ray_address}
    if launcher == "ray-router":  # no CPU of Ray's reserved for it, like the local router
        base |= {"router_on_ray": True, "router_resources": {"num_cpus": 0}}
    return base


def run_layout(args, launcher: str, ray_address: str | None, specs, warm) -> dict:
    log = Path(args.log_dir) / f"{launcher}-{int(time.time())}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    server = ServeProcess(settings(args, launcher, ray_address), log_path=log)
    try:
        if not server.wait_ready(300):
            raise SystemExit(f"{launcher}: server did not start; see {log}")
        startup_s = time.perf_counter() - start
        model = fetch_model_id(server.url)
        send = dict(extra_body={"ignore_eos": True}, seed=args.seed, progress=False)
        arrival = Arrival.closed(args.concurrency)
        run_benchmark_sync(server.url, model, warm, arrival, num_requests=len(warm), **send)
        result = run_benchmark_sync(
            server.url, model, specs, arrival, num_requests=len(specs), **send
        )
    finally:
        stragglers = server.stop()
    if stragglers:
        print(f"warning: killed leftover processes {stragglers}", file=sys.stderr)
    s = summarize(result)
    nan = float("nan")  # no request succeeded: the row says so instead of crashing
    return {
        "launcher": launcher,
        "startup_s": startup_s,
        "errors": s.num_errors,
        "ttft_p50_ms": s.ttft_ms.p50 if s.ttft_ms else nan,
        "ttft_p99_ms": s.ttft_ms.p99 if s.ttft_ms else nan,
        "tpot_p50_ms": s.tpot_ms.p50 if s.tpot_ms else nan,
        "output_tok_s": s.output_throughput,
    }


def start_ray(args):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2 * args.threads,
            "include_dashboard": False,
            # Local workers have no memory killer either: same rules on both sides.
            "_system_config": {"memory_monitor_refresh_ms": 0},
        },
    )
    ray.shutdown()  # this script only starts the cluster; `pdserve serve` is its driver
    return cluster


def table(rows: list[dict]) -> str:
    lines = [
        "| round | launcher | start-up s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | output tok/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['launcher']} | {r['startup_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | {r['output_tok_s']:.1f} | "
            f"{r['errors']} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    def median(launcher: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["launcher"] == launcher)

    lines = []
    for layout in sorted({r["launcher"] for r in rows} - {"local"}):
        ttft = median(layout, "ttft_p50_ms") / median("local", "ttft_p50_ms")
        tput = median(layout, "output_tok_s") / median("local", "output_tok_s")
        startup = median(layout, "startup_s") - median("local", "startup_s")
        met = ttft <= 1 + GOAL and tput >= 1 - GOAL
        lines.append(
            f"{layout} / local (medians over rounds): TTFT p50 {ttft:.3f}x, output throughput "
            f"{tput:.3f}x, start-up {startup:+.1f} s; steady-state goal (within {GOAL:.0%}) "
            f"{'met' if met else 'NOT met'}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument(
        "--settle-s", type=float, default=10.0, help="pause before each server starts"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="/tmp/pdserve-ray-overhead-bench")
    parser.add_argument("--json-out", default=None)
    parser.add_argument(
        "--layouts", default="local,ray,ray-router", help="local first: ratios are to it"
    )
    args = parser.parse_args()
    import ray

    common.print_header(
        "Ray launcher overhead",
        {
            "hardware": {**common.hardware_info(), "load_1min": common.machine_load()},
            "setup": {
                "layout": f"disaggregated 1P+1D, {args.threads} thread(s) per worker",
                "ray": ray.__version__,
                "workload": f"random in={args.input_tokens} out={args.output_tokens}",
                "load": f"c={args.concurrency}, {args.num_requests} measured after "
                f"{args.warmup}, {args.rounds} rounds",
            },
        },
    )
    workload = get_workload(f"random:in={args.input_tokens},out={args.output_tokens}")
    specs = workload.sample(args.num_requests + args.warmup, seed=args.seed)
    warm, measured = specs[: args.warmup], specs[args.warmup :]
    cluster = start_ray(args)
    rows = []
    try:
        layouts = args.layouts.split(",")
        for i in range(args.rounds):
            # Each round starts with another layout: the slot after Ray's start-up or after
            # another layout's teardown is a slower one (measured: local always first ran
            # ~1.5x the TTFT p50 of local alone), and it must not fall on one layout.
            for launcher in layouts[i % len(layouts) :] + layouts[: i % len(layouts)]:
                time.sleep(args.settle_s)
                row = run_layout(args, launcher, cluster.address, measured, warm)
                rows.append({"round": i + 1, **row})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        cluster.shutdown()
    print()
    print(table(rows))
    print(verdict(rows))
    common.write_json(args.json_out, {"rows": rows, "verdict": verdict(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
