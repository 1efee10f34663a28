"""TTFT of disaggregated vs aggregated serving, with layer-wise KV streaming on and off.

What it isolates: the cost of the hand-off. Every configuration gives the prefill the same
compute (one worker with `--threads` threads does it), so the ratio shows what
disaggregation adds on top: the reservation round trip to the decode worker, the
prefill request, and — with streaming off — sending the KV after the forward pass.

    aggregated       1 mixed worker                       (prefill + decode in one engine)
    disagg/<backend> 1 prefill + 1 decode worker, KV over shm or tcp, streaming on | off

TTFT is measured at the router (`ClusterClient`, the object behind the HTTP server), from
the call to the first token, one request at a time, each prompt unique (no prefix-cache
hits), median of `--repeats` after a warm-up. Also reported: the time to the *second*
token, which does wait for the KV to reach the decode worker.

    python benchmarks/ttft_disagg.py [--lengths 128,1024,4096] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import common

from pdserve.router.cluster import ClusterClient
from pdserve.sampling_params import SamplingParams
from pdserve.serve import ServeConfig, WorkerProcesses

GOAL = 1.10  # disaggregated TTFT / aggregated TTFT at 1k+ tokens, streaming on


async def measure(config: ServeConfig, model_dir: Path, prompts: dict[int, list[list[int]]]):
    """{length: (median TTFT s, median second-token s)} for one configuration."""
    counts = config.worker_counts()
    client = ClusterClient(
        model_dir, "tcp://127.0.0.1:0", routing=config.routing(), min_workers=sum(counts.values())
    )
    await client.start()
    workers = WorkerProcesses(config, model_dir, client.router_addr)
    workers.start(counts)
    try:
        ready = await client.wait_until_ready(300)
        if not ready.is_ready:
            raise RuntimeError(f"cluster not ready: {ready.reason}")
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        results = {}
        for length, batch in prompts.items():
            ttfts, seconds = [], []
            for i, ids in enumerate(batch):
                start = time.perf_counter()
                times = []
                async for _ in client.generate(f"{length}-{i}", None, ids, params):
                    times.append(time.perf_counter() - start)
                if i == 0:
                    continue  # warm-up
                ttfts.append(times[0])
                seconds.append(times[-1])
            results[length] = (statistics.median(ttfts), statistics.median(seconds))
        return results
    finally:
        await client.stop()
        workers.stop()


def configurations(threads: int, backends: list[str]) -> dict[str, ServeConfig]:
    common_args = dict(threads_per_worker=threads, log_level="WARNING")
    configs = {"aggregated": ServeConfig(mode="aggregated", **common_args)}
    for backend in backends:
        for layerwise in (True, False):
            name = f"disagg/{backend}/{'stream' if layerwise else 'no-stream'}"
            configs[name] = ServeConfig(
                mode="disaggregated", kv_backend=backend, kv_layerwise=layerwise, **common_args
            )
    return configs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: built-in model)")
    p.add_argument(
        "--lengths", default="128,1024,4096", type=lambda s: [int(x) for x in s.split(",")]
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="threads of the prefilling worker")
    p.add_argument("--backends", default="shm,tcp", type=lambda s: s.split(","))
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    model_dir = common.resolve_model_dir(args.model)
    config = common.load_config(model_dir)
    lengths = args.lengths
    prompts = {
        n: common.random_prompts([n] * (args.repeats + 1), config["vocab_size"], seed=n)
        for n in lengths
    }
    common.print_header(
        "TTFT: disaggregated vs aggregated",
        {
            "hardware": common.hardware_info(),
            "model": common.model_info(model_dir),
            "workload": {
                "prompt_lengths": lengths,
                "repeats": args.repeats,
                "max_tokens": 2,
                "threads_per_worker": args.threads,
                "concurrency": 1,
            },
        },
    )
    results = {}
    for name, serve_config in configurations(args.threads, args.backends).items():
        print(f"measuring {name} ...", flush=True)
        results[name] = asyncio.run(measure(serve_config, model_dir, prompts))
    base = results["aggregated"]
    rows = []
    verdicts = []
    for name, by_length in results.items():
        for n in lengths:
            ttft, second = by_length[n]
            ratio = ttft / base[n][0]
            rows.append([name, n, f"{ttft * 1e3:.1f}", f"{ratio:.3f}x", f"{second * 1e3:.1f}"])
            if "stream" in name and "no-stream" not in name and n >= 1000:
                verdicts.append(ratio)
    print(
        common.format_table(["config", "prompt", "TTFT ms", "vs aggregated", "2nd token ms"], rows)
    )
    worst = max(verdicts) if verdicts else None
    if worst is not None:
        print(
            f"worst disaggregated/aggregated TTFT at 1k+ tokens, streaming on: {worst:.3f}x "
            f"(goal <= {GOAL}x): {'met' if worst <= GOAL else 'missed'}"
        )
    common.write_json(
        args.json_out,
        {
            "results": {k: {str(n): v for n, v in r.items()} for k, r in results.items()},
            "worst_ratio_streaming_1k_plus": worst,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
