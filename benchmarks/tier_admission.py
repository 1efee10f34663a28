"""Hot-prompt-aware KV tiers: admit-all vs frequency admission into a disk tier that is
smaller than the working set, side by side in one run.

A real `pdserve serve` (aggregated, one mixed worker, a small device pool so that prefixes
leave it, and a disk tier sized to a fraction of the prefixes that recur: by default a
quarter of them, then 1.5x them, where admitting everything costs no hits) is driven by
`pdserve bench`'s load generator with a Zipf-popularity shared-prefix workload — `rag`
(many documents of a few hundred tokens, Zipf popularity, each followed by a question asked
once) or `agent` (several tool descriptions, Zipf popularity, each session growing its own
scratchpad) — once with `kv_tier_admission: all` and once with `frequency`. The same
requests in the same order; the first `--warmup` fill the tiers and are not measured.

Reported per policy, from the worker's counters (`/metrics`) and the requests' `usage`:
the share of prompt tokens served from disk (the tier's hit rate the goal is judged by),
the disk tier's block hit rate (blocks found / blocks asked of it: a lookup walks to its
first miss, so this reads high), the prefix-cache hit rate over every tier, TTFT p50/p99, bytes written to the
disk tier, blocks admitted/rejected. Goal (issue 18): the same hit rate with >= 3x fewer
bytes written, or a higher hit rate at the same tier size.

    python benchmarks/tier_admission.py [--workload rag|agent] [--num-requests 300] [--json-out F]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

import common

from pdserve.bench.launcher import ServeProcess
from pdserve.bench.loadgen import Arrival, fetch_model_id, run_benchmark_sync
from pdserve.bench.metrics import summarize
from pdserve.bench.workloads import LogNormal, Uniform, get_workload
from pdserve.kv.block_hash import hash_block_chain
from pdserve.tokenizer import Tokenizer

POLICIES = ("all", "frequency")
BLOCK_SIZE = 16
BYTES_GOAL = 3.0  # admit-all bytes written / frequency's, at no lower hit rate
ADMIN_KEY = "tier-admission-bench"
TIER_METRICS = ("hit_blocks", "lookup_blocks", "written_bytes", "admitted_blocks")
TIER_METRICS += ("rejected_blocks",)


def workload(args):
    """The Zipf shared-prefix workload, with short outputs (TTFT is what tiers change)."""
    if args.workload == "rag":
        base = get_workload(f"rag:documents={args.prefixes},zipf={args.zipf}")
        low, high = (int(x) for x in args.prefix_tokens.split("-"))
        return dataclasses.replace(
            base,
            document_tokens=Uniform(low, high),
            question_tokens=LogNormal(24, 0.5, 8, 64),
            output_tokens=Uniform(args.output_tokens, args.output_tokens),
        )
    base = get_workload(f"agent:systems={args.prefixes},zipf={args.zipf}")
    return dataclasses.replace(
        base,
        system_tokens=int(args.prefix_tokens.split("-")[-1]),
        task_tokens=LogNormal(32, 0.5, 8, 96),
        observation_tokens=LogNormal(48, 0.6, 8, 192),
        steps=Uniform(2, 4),
        output_tokens=Uniform(args.output_tokens, args.output_tokens),
    )


def recurring_blocks(specs, tokenizer) -> tuple[int, int]:
    """(distinct full prompt blocks, those that occur in two requests or more)."""
    seen: collections.Counter[int] = collections.Counter()
    for spec in specs:
        ids = tokenizer.encode(spec.prompt)
        seen.update(set(hash_block_chain(ids, BLOCK_SIZE)))
    return len(seen), sum(1 for n in seen.values() if n >= 2)


def scrape_disk(url: str) -> dict[str, float]:
    """The disk tier's counters from /metrics, summed over workers."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = dict.fromkeys(TIER_METRICS, 0.0)
    pattern = r"pdserve:kv_tier_(\w+?)(?:_total)?\{([^}]*)\} (\S+)"
    for name, labels, value in re.findall(pattern, text):
        if name in out and 'tier="disk"' in labels:
            out[name] += float(value)
    return out


def hot_prefixes(url: str, limit: int = 5) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/admin/prefixes?limit={limit}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        chains = json.loads(response.read())["chains"]
    return [{k: c[k] for k in ("hash", "num_blocks", "hits", "held")} for c in chains]


def run_policy(policy: str, specs, tier_gib: float, model_dir: Path, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="pdserve-tier-bench-") as folder:
        settings = {
            "model": str(model_dir),
            "mode": "aggregated",
            "mixed_workers": 1,
            "threads_per_worker": args.threads,
            "admin_key": ADMIN_KEY,
            # A shared, overloaded host can stall one engine step for seconds: a worker
            # declared dead and restarted would lose its device cache mid-measurement.
            "worker_lease_s": 120,
            "engine": {
                "num_kv_blocks": args.pool_blocks,
                "max_model_len": 4096,
                "kv_disk_cache_dir": folder,
                "kv_disk_cache_gib": tier_gib,
                "kv_tier_admission": policy,
                "kv_tier_admission_threshold": args.threshold,
            },
        }
        log = Path(args.log_dir) / f"{args.workload}-{policy}.log"
        server = ServeProcess(settings, log_path=log)
        try:
            if not server.wait_ready(300):
                raise SystemExit(f"server did not start; see {log}")
            model = fetch_model_id(server.url)
            send = dict(extra_body={"ignore_eos": True}, seed=args.seed, progress=False)
            warm = specs[: args.warmup]
            run_benchmark_sync(server.url, model, warm, Arrival.closed(args.concurrency),
                               num_requests=len(warm), **send)  # fmt: skip
            before = scrape_disk(server.url)
            measured = specs[args.warmup :]
            result = run_benchmark_sync(server.url, model, measured,
                                        Arrival.closed(args.concurrency),
                                        num_requests=len(measured), **send)  # fmt: skip
            after = scrape_disk(server.url)
            top = hot_prefixes(server.url)
        finally:
            stragglers = server.stop()
        if stragglers:
            print(f"warning: killed leftover processes {stragglers}", file=sys.stderr)
    measured = row(policy, result, before, after, top)
    print(f"{policy}: " + json.dumps({k: v for k, v in measured.items() if k != "hot_prefixes"}),
          flush=True)  # fmt: skip
    return measured


def row(policy: str, result, before: dict, after: dict, top: list[dict]) -> dict:
    s = summarize(result)
    delta = {k: after[k] - before[k] for k in TIER_METRICS}
    prompt_tokens = sum(r.num_prompt_tokens or 0 for r in result.records)
    return {
        "policy": policy,
        "requests": s.num_requests,
        "errors": s.num_errors,
        "disk_hit_rate": delta["hit_blocks"] / delta["lookup_blocks"]
        if delta["lookup_blocks"]
        else None,
        "tokens_from_disk": delta["hit_blocks"] * BLOCK_SIZE / prompt_tokens
        if prompt_tokens
        else None,
        "prefix_hit_rate": s.prefix_cache_hit_rate,
        "ttft_p50_ms": s.ttft_ms.p50 if s.ttft_ms else None,
        "ttft_p99_ms": s.ttft_ms.p99 if s.ttft_ms else None,
        "written_mib": delta["written_bytes"] / 2**20,
        "written_mib_total": after["written_bytes"] / 2**20,
        "admitted_blocks": delta["admitted_blocks"],
        "rejected_blocks": delta["rejected_blocks"],
        "hot_prefixes": top,
    }


def verdict(rows: dict[str, dict]) -> str:
    """The goal, with the tier's hit rate taken as the share of prompt tokens it served:
    per block lookup, a walk that stops at its first miss after 30 hits reads 30/31."""
    every, freq = rows["all"], rows["frequency"]
    ratio = every["written_mib"] / freq["written_mib"] if freq["written_mib"] else float("inf")
    hit_all, hit_freq = every["tokens_from_disk"] or 0.0, freq["tokens_from_disk"] or 0.0
    same_hits = hit_freq >= hit_all - 0.01
    met = (same_hits and ratio >= BYTES_GOAL) or hit_freq > hit_all + 0.01
    return (
        f"bytes written all / frequency = {ratio:.2f}x (goal >= {BYTES_GOAL}x at no lower hit "
        f"rate); prompt tokens served from disk {hit_all:.3f} (all) vs {hit_freq:.3f} "
        f"(frequency); goal {'met' if met else 'NOT met'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--workload", choices=("rag", "agent"), default="rag")
    parser.add_argument("--prefixes", type=int, default=32, help="documents / tool descriptions")
    parser.add_argument("--prefix-tokens", default="128-320", help="their length, LO-HI")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    parser.add_argument("--num-requests", type=int, default=200, help="warm-up included")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--output-tokens", type=int, default=4)
    parser.add_argument("--tier-fractions", default="0.25,1.5",
                        help="disk tier sizes / KV of the blocks that recur")  # fmt: skip
    parser.add_argument("--pool-blocks", type=int, default=64, help="device KV pool blocks")
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="/tmp/pdserve-tier-admission-bench")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    model_dir = common.resolve_model_dir(args.model)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    chosen = workload(args)
    specs = chosen.sample(args.num_requests, args.seed, tokenizer)
    num_blocks, num_recurring = recurring_blocks(specs, tokenizer)
    info = common.model_info(model_dir)
    block_bytes = 16 * 1024 * BLOCK_SIZE  # built-in model: 16 KiB of fp32 KV per token
    fractions = [float(f) for f in args.tier_fractions.split(",")]
    recurring_gib = num_recurring * block_bytes / 2**30
    setup = {
        "workload": f"{chosen.name}: {chosen.description}; {args.num_requests} requests "
        f"({args.warmup} warm-up), closed loop {args.concurrency}, {args.output_tokens} "
        f"output tokens, ignore_eos",
        "working set": f"{num_blocks} distinct prompt blocks, {num_recurring} recurring "
        f"({num_recurring * block_bytes / 2**20:.0f} MiB)",
        "server": f"aggregated, 1 mixed worker x {args.threads} threads, device pool "
        f"{args.pool_blocks} blocks, disk tier {fractions} x the recurring blocks' KV, "
        f"frequency threshold {args.threshold}",
    }
    common.print_header("KV tier admission", {"hardware": common.hardware_info(),
                                              "model": info, "setup": setup})  # fmt: skip
    results = {}
    for fraction in fractions:
        tier_gib = fraction * recurring_gib
        rows = {p: run_policy(p, specs, tier_gib, model_dir, args) for p in POLICIES}
        results[f"{fraction:g}"] = {"tier_mib": tier_gib * 1024, "rows": rows,
                                    "verdict": verdict(rows)}  # fmt: skip
        print(f"tier {fraction:g} x recurring ({tier_gib * 1024:.0f} MiB): {verdict(rows)}")
    headers = ["tier MiB", "policy", "disk block hits", "tokens from disk", "prefix hits",
               "TTFT p50 ms", "TTFT p99 ms", "written MiB", "admitted", "rejected", "err"]  # fmt: skip
    table = [
        [round(res["tier_mib"]), r["policy"], r["disk_hit_rate"], r["tokens_from_disk"],
         r["prefix_hit_rate"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["written_mib"],
         r["admitted_blocks"], r["rejected_blocks"], r["errors"]]
        for res in results.values()
        for r in res["rows"].values()
    ]  # fmt: skip
    print()
    print(common.format_table(headers, table))
    for fraction, res in results.items():
        print(f"tier {fraction} x recurring: {res['verdict']}")
    first = next(iter(results.values()))["rows"]["frequency"]["hot_prefixes"]
    print(f"hottest prefixes (first frequency run): {first[:3]}")
    common.write_json(args.json_out, {"setup": setup, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
