"""TTFT of disaggregated vs aggregated serving, with layer-wise KV streaming on and off.

What it isolates: the cost of the hand-off. Every configuration gives the prefill the same
compute (one worker with `--threads` threads does it), so the ratio shows what
disaggregation adds on top: the reservation round trip to the decode worker, the
prefill request, and — with streaming off — sending the KV after the forward pass.

    aggregated       1 mixed worker                       (prefill + decode in one engine)
    disagg/<backend> 1 prefill + 1 decode worker, KV over shm or tcp, streaming on | off

TTFT is measured at the router (`ClusterClient`, the object behind the HTTP server), from
the call to the first token, one request at a time, each prompt unique (no prefix-cache
hits), median of `--repeats` after a warm-up. All configurations run at once and take
requests in turn, so the machine's drift over minutes hits each of them alike. Also reported: the time to the *second*
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

from pdserve.config import EngineConfig
from pdserve.router.cluster import ClusterClient
from pdserve.sampling_params import SamplingParams
from pdserve.serve import ServeConfig, WorkerProcesses

GOAL = 1.10  # disaggregated TTFT / aggregated TTFT at 1k+ tokens, streaming on


class Cluster:
    """One configuration: a router client and its worker processes."""

    def __init__(self, config: ServeConfig, model_dir: Path) -> None:
        self.config = config
        self.model_dir = model_dir
        counts = config.worker_counts()
        self.client = ClusterClient(
            model_dir,
            "tcp://127.0.0.1:0",
            routing=config.routing(),
            min_workers=sum(counts.values()),
        )
        self.workers: WorkerProcesses | None = None

    async def start(self) -> None:
        await self.client.start()
        self.workers = WorkerProcesses(self.config, self.model_dir, self.client.router_addr)
        self.workers.start(self.config.worker_counts())

    async def ttft(self, request_id: str, token_ids: list[int]) -> tuple[float, float]:
        """Seconds to the first and to the second token."""
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        start = time.perf_counter()
        times = []
        async for _ in self.client.generate(request_id, None, token_ids, params):
            times.append(time.perf_counter() - start)
        return times[0], times[-1]

    async def stop(self) -> None:
        await self.client.stop()
        if self.workers is not None:
            self.workers.stop()


async def measure(configs: dict[str, ServeConfig], model_dir: Path, prompts, repeats: int):
    """{config: {length: [(TTFT s, second-token s) per prompt]}}, prompts in the same order
    for every configuration.

    Every configuration runs at once (idle workers cost next to nothing) and requests go
    to them in turn, one at a time: this machine's prefill speed drifts by +-15 % over
    minutes, and interleaving keeps that drift out of the ratios.
    """
    clusters = {name: Cluster(config, model_dir) for name, config in configs.items()}
    try:
        for cluster in clusters.values():
            await cluster.start()
        for name, cluster in clusters.items():
            ready = await cluster.client.wait_until_ready(300)
            if not ready.is_ready:
                raise RuntimeError(f"{name} not ready: {ready.reason}")
        samples = {name: {n: [] for n in prompts} for name in clusters}
        names = list(clusters)
        for n, batch in prompts.items():
            for i, token_ids in enumerate(batch):
                order = names[i % len(names) :] + names[: i % len(names)]
                for name in order:
                    # Each config sees each prompt once: unique per config, no cache hits.
                    result = await clusters[name].ttft(f"{n}-{i}", token_ids)
                    if i > 0:  # the first round warms up
                        samples[name][n].append(result)
        return samples
    finally:
        for cluster in clusters.values():
            await cluster.stop()


def configurations(threads: int, backends: list[str]) -> dict[str, ServeConfig]:
    # A 0.5 GiB pool per worker holds 8k tokens of the built-in model, plenty here, and
    # keeps nine workers' pools (in /dev/shm for shm) small.
    common_args = dict(
        threads_per_worker=threads,
        log_level="WARNING",
        engine=EngineConfig(kv_cache_memory_gib=0.5),
    )
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
    p.add_argument("--repeats", type=int, default=8)
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
    configs = configurations(args.threads, args.backends)
    print(f"measuring {', '.join(configs)} (interleaved) ...", flush=True)
    results = asyncio.run(measure(configs, model_dir, prompts, args.repeats))
    base = results["aggregated"]
    rows = []
    verdicts = []
    for name, by_length in results.items():
        for n in lengths:
            samples = by_length[n]
            ttft = statistics.median(t for t, _ in samples)
            second = statistics.median(t for _, t in samples)
            # Paired: the same prompt, back to back, on this config and on aggregated.
            ratio = statistics.median(
                t / b for (t, _), (b, _) in zip(samples, base[n], strict=True)
            )
            rows.append([name, n, f"{ttft * 1e3:.1f}", f"{ratio:.3f}x", f"{second * 1e3:.1f}"])
            if "stream" in name and "no-stream" not in name and n >= 1000:
                verdicts.append(ratio)
    headers = ["config", "prompt", "TTFT ms (median)", "vs aggregated (median of pairs)"]
    print(common.format_table([*headers, "2nd token ms"], rows))
    worst = max(verdicts) if verdicts else None
    if worst is not None:
        print(
            f"worst disaggregated/aggregated TTFT at 1k+ tokens, streaming on: {worst:.3f}x "
            f"(goal <= {GOAL}x): {'met' if worst <= GOAL else 'missed'}"
        )
    common.write_json(
        args.json_out,
        {
            "samples": {k: {str(n): v for n, v in r.items()} for k, r in results.items()},
            "worst_ratio_streaming_1k_plus": worst,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
