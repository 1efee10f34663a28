"""KV-centric caching and routing: what the global prefix index and the tiers buy.

Two experiments, each a real `pdserve serve` on this machine driven by `pdserve bench`'s
load generator (token counts and cache hits from the server's `usage`):

1. Routing (`--part routing`): 2 mixed workers (aggregated, 1 thread each) serve the
   shared-prefix workloads — `rag` (here 12 documents of 1-2k tokens, Zipf popularity,
   so the documents together outgrow one worker's KV pool but fit in two), `multiturn`
   and `agent` — under Poisson arrivals, once per routing policy: `kv_aware`,
   `round_robin`, `least_loaded`. Reported: TTFT p50/p99, output throughput, and the
   prefix-cache hit rate (cached / prompt tokens). Goal: kv_aware's p50 TTFT ≥ 3x lower
   than the others' where prefixes make up ≥ 80 % of the prompt.
2. Restart (`--part restart`): one mixed worker; a few distinct ~4k-token prompts are
   served, the server is stopped (SIGTERM) and started again, and the same prompts are
   sent again — with a disk tier (`kv_disk_cache_dir`) and without any tier. Reported: TTFT
   after the restart, disk / none. Goal: ≤ 0.2x.

    python benchmarks/kv_cache.py [--part routing|restart|all] [--json-out F]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import common

from pdserve.bench.launcher import ServeProcess
from pdserve.bench.loadgen import Arrival, fetch_model_id, run_benchmark_sync
from pdserve.bench.metrics import summarize
from pdserve.bench.types import SLO
from pdserve.bench.workloads import WORKLOADS, RagWorkload, Uniform, get_workload
from pdserve.tokenizer import Tokenizer

POLICIES = ("kv_aware", "round_robin", "least_loaded")
ROUTING_GOAL = 3.0  # others' p50 TTFT / kv_aware's
RESTART_GOAL = 0.2  # TTFT after a restart, disk tier / no tier
# 16 KiB of KV per token for the built-in model (8 layers x k,v x 4 heads x 64 x fp32):
# 0.25 GiB holds 16k tokens, less than the 12 documents' ~18k.
POOL_GIB = 0.25


def rag_workload() -> RagWorkload:
    return RagWorkload(
        "rag",
        "12 shared documents of 1024-2048 tokens (Zipf popularity) + a short question",
        SLO(ttft_ms=1000, tpot_ms=100),
        num_documents=12,
        document_tokens=Uniform(1024, 2048),
    )


def scrape(url: str) -> dict[str, float]:
    """The router's prefix-index counters from /metrics (summed over labels but tier)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(
            r"pdserve:router_prefix_cache_(queries|hits)_total(\{[^}]*\})? (\S+)", line
        )
        if match:
            kind, labels, value = match.groups()
            tier = re.search(r'tier="(\w+)"', labels or "")
            key = f"{kind}:{tier.group(1)}" if tier else kind
            out[key] = out.get(key, 0.0) + float(value)
    return out


def routing(model_dir: Path, args) -> dict:
    tokenizer = Tokenizer.from_pretrained(model_dir)
    workloads = {"rag": rag_workload(), "multiturn": WORKLOADS["multiturn"]}
    workloads["agent"] = WORKLOADS["agent"]
    results: dict[str, dict] = {}
    for name, workload in workloads.items():
        specs = workload.sample(args.num_requests, args.seed, tokenizer)
        endpoint = "chat" if specs[0].prompt is None else "completions"
        results[name] = {}
        for policy in POLICIES:
            settings = {
                "model": str(model_dir),
                "mode": "aggregated",
                "mixed_workers": 2,
                "threads_per_worker": 1,
                "routing_policy": policy,
                "engine": {"kv_cache_memory_gib": POOL_GIB},
            }
            server = ServeProcess(settings, log_path=Path(args.log_dir) / f"{name}-{policy}.log")
            try:
                if not server.wait_ready(300):
                    raise SystemExit(f"server did not start; see {args.log_dir}")
                model = fetch_model_id(server.url)
                before = scrape(server.url)
                result = run_benchmark_sync(
                    server.url, model, specs, Arrival.poisson(args.rate),
                    num_requests=len(specs), endpoint=endpoint,
                    extra_body={"ignore_eos": True}, seed=args.seed, progress=False,
                )  # fmt: skip
                after = scrape(server.url)
            finally:
                server.stop()
            s = summarize(result)
            queries = after.get("queries", 0) - before.get("queries", 0)
            row = {
                "requests": s.num_requests,
                "errors": s.num_errors,
                "ttft_p50_ms": s.ttft_ms.p50 if s.ttft_ms else None,
                "ttft_p99_ms": s.ttft_ms.p99 if s.ttft_ms else None,
                "output_tok_s": s.output_throughput,
                "hit_rate": s.prefix_cache_hit_rate,
                "index_hit_rate_device": _delta(after, before, "hits:device") / queries
                if queries
                else None,
            }
            results[name][policy] = row
            print(f"{name:<10} {policy:<13} {_fmt_row(row)}", flush=True)
    return results


def _delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def _fmt_row(row: dict) -> str:
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def restart(model_dir: Path, args) -> dict:
    tokenizer = Tokenizer.from_pretrained(model_dir)
    workload = get_workload(f"random:in={args.restart_tokens},out=4")
    specs = workload.sample(args.restart_prompts, args.seed, tokenizer)
    results = {}
    for tier in ("none", "disk"):
        with tempfile.TemporaryDirectory(prefix="pdserve-kv-disk-") as folder:
            engine = {"kv_cache_memory_gib": 1.0, "max_model_len": 8192}
            if tier == "disk":
                engine["kv_disk_cache_dir"] = folder
            settings = {
                "model": str(model_dir),
                "mode": "aggregated",
                "mixed_workers": 1,
                "threads_per_worker": 2,
                "engine": engine,
            }
            rounds = []
            for attempt in ("first", "after restart"):
                log = Path(args.log_dir) / f"restart-{tier}-{attempt.replace(' ', '-')}.log"
                server = ServeProcess(settings, log_path=log)
                try:
                    if not server.wait_ready(300):
                        raise SystemExit(f"server did not start; see {log}")
                    model = fetch_model_id(server.url)
                    run = run_benchmark_sync(
                        server.url, model, specs, Arrival.closed(1), num_requests=len(specs),
                        extra_body={"ignore_eos": True}, progress=False,
                    )  # fmt: skip
                finally:
                    server.stop()
                ttfts = [r.ttft_s * 1e3 for r in run.records if r.ttft_s is not None]
                cached = [r.num_cached_tokens for r in run.records]
                prompt = [r.num_prompt_tokens for r in run.records]
                rounds.append({"ttft_ms": ttfts, "cached_tokens": cached, "prompt_tokens": prompt})
                print(
                    f"{tier:<5} {attempt:<14} TTFT median {statistics.median(ttfts):8.1f} ms"
                    f" (each: {[round(t) for t in ttfts]})  cached {cached} of {prompt}",
                    flush=True,
                )
            results[tier] = rounds
    none = statistics.median(results["none"][1]["ttft_ms"])
    disk = statistics.median(results["disk"][1]["ttft_ms"])
    results["ratio_disk_vs_none"] = disk / none
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--part", choices=("routing", "restart", "all"), default="all")
    parser.add_argument("--num-requests", type=int, default=60, help="per routing run")
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s (routing)")
    parser.add_argument("--restart-tokens", type=int, default=4096)
    parser.add_argument("--restart-prompts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="/tmp/pdserve-kv-cache-bench")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    model_dir = common.resolve_model_dir(args.model)
    common.print_header(
        "KV-centric caching and routing",
        {
            "hardware": common.hardware_info(),
            "model": common.model_info(model_dir),
            "workload": {
                "routing": f"rag (12 docs), multiturn, agent; {args.num_requests} requests, "
                f"Poisson {args.rate} req/s, 2 mixed workers x 1 thread, "
                f"KV pool {POOL_GIB} GiB per worker, ignore_eos",
                "restart": f"{args.restart_prompts} prompts of {args.restart_tokens} tokens, "
                "1 mixed worker x 2 threads, closed loop 1, 4 output tokens",
            },
        },
    )
    payload: dict = {}
    if args.part in ("routing", "all"):
        payload["routing"] = results = routing(model_dir, args)
        print()
        headers = ["workload", "policy", "TTFT p50", "TTFT p99", "out tok/s", "hit rate", "err"]
        rows = [
            [w, p, r["ttft_p50_ms"], r["ttft_p99_ms"], r["output_tok_s"], r["hit_rate"],
             r["errors"]]
            for w, by_policy in results.items()
            for p, r in by_policy.items()
        ]  # fmt: skip
        print(common.format_table(headers, rows))
        for w, by_policy in results.items():
            mine = by_policy["kv_aware"]["ttft_p50_ms"]
            for other in ("round_robin", "least_loaded"):
                theirs = by_policy[other]["ttft_p50_ms"]
                ratio = theirs / mine if mine and theirs else None
                verdict = common.goal_verdict(ratio, ROUTING_GOAL)
                print(
                    f"{w}: p50 TTFT {other} / kv_aware = {ratio:.2f}x "
                    f"(goal >= {ROUTING_GOAL}x: {verdict})"
                )
    if args.part in ("restart", "all"):
        payload["restart"] = res = restart(model_dir, args)
        ratio = res["ratio_disk_vs_none"]
        verdict = "met" if ratio <= RESTART_GOAL else "missed"
        print(
            f"\nTTFT after restart, disk tier / no tier: {ratio:.3f}x "
            f"(goal <= {RESTART_GOAL}x: {verdict})"
        )
    common.write_json(args.json_out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
