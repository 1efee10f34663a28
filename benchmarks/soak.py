"""Soak: steady load on `pdserve serve` for a long time, RSS of every process sampled.

A leak in the router (a request's state never freed, metrics labels without bound) or in
a worker (blocks, tensors, transfer buffers) shows as memory that keeps growing under a
load that does not. This runs a closed loop of `--concurrency` streaming clients (a mix:
most requests complete, some are abandoned mid-stream, some are refused by a key's quota,
some are invalid) for `--minutes`, sampling the resident set size of the router and of each
worker every `--sample-s` seconds.

VmRSS alone cannot tell a leak from memory that was reserved up front and is only now being
touched: a CPU worker's KV pool is a file in /dev/shm whose pages count in RSS (as RssShmem)
only once the process first touches them, and a prefill worker also maps the decode
worker's pool. So each sample also splits VmRSS into RssAnon (the heap: tensors, Python
objects — where a leak would show), RssFile and RssShmem.

Reported: each of those per process at the end of the warm-up (`--warmup-minutes`) and at
the end, the growth in per cent (goal: within 5 %), the least-squares slope after warm-up
(MiB per minute), and requests by outcome. Processes are looked up at every sample, so a
worker that the router declared dead and restarted shows as a new process (and the run
says when), not as a jump in the old one's memory.

    python benchmarks/soak.py [--minutes 30] [--warmup-minutes 5] [--concurrency 8]
        [--think-s 0] [--kv-cache-gib 1] [--mode disaggregated]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import common
from overload_admission import Server

KEY = "sk-soak"
GOAL_GROWTH = 0.05


FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def rss_mib(pid: int) -> dict[str, float] | None:
    """VmRSS and its parts (MiB) of a process, None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in FIELDS:
            found[name] = int(value.split()[0]) / 1024
    return found or None


def role(pid: int) -> str:
    """A short name for a worker: its role if the command line says it."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"worker-{pid}"
    for word in ("prefill", "decode", "mixed"):
        if any(word in a for a in args):
            return f"{word}-{pid}"
    return f"worker-{pid}"


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (the workers of `pdserve serve`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def request_body(rng: random.Random, vocab_size: int) -> tuple[str, dict]:
    """One request of the mix: (kind, body)."""
    kind = rng.choices(["complete", "abandon", "invalid"], weights=[80, 15, 5])[0]
    prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randrange(16, 256))]
    body = {"prompt": prompt, "max_tokens": rng.randrange(4, 48), "stream": True}
    if kind == "invalid":
        body["temperature"] = "hot"
    return kind, body


async def client(
    url: str, end: float, vocab_size: int, seed: int, counts: dict, think_s: float = 0.0
) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        while time.monotonic() < end:
            kind, body = request_body(rng, vocab_size)
            try:
                async with http.post(url + "/v1/completions", data=json.dumps(body)) as r:
                    key = f"{kind}:{r.status}"
                    if r.status == 200 and kind == "abandon":
                        await r.content.readline()  # the first event, then hang up
                    else:
                        await r.read()
            except aiohttp.ClientError as exc:
                key = f"{kind}:{type(exc).__name__}"
            counts[key] = counts.get(key, 0) + 1
            if key.endswith(":429"):
                await asyncio.sleep(0.5)  # refused by the quota: back off a little
            if think_s:
                await asyncio.sleep(rng.expovariate(1 / think_s))


def processes(server_pid: int) -> dict[str, int]:
    """The router and its workers now, by name (a restarted worker has a new pid, so a
    new name: its memory is not mistaken for growth of the one it replaced)."""
    return {"router": server_pid, **{role(pid): pid for pid in children(server_pid)}}


async def sample(server_pid: int, end: float, every_s: float, samples: list) -> None:
    start = time.monotonic()
    while time.monotonic() < end:
        found = {n: rss_mib(p) for n, p in processes(server_pid).items()}
        samples.append((time.monotonic() - start, {n: v for n, v in found.items() if v}))
        await asyncio.sleep(every_s)


def lifetimes(samples: list) -> dict[str, tuple[float, float]]:
    """Per process name: the first and last time it was sampled."""
    seen: dict[str, tuple[float, float]] = {}
    for t, found in samples:
        for name in found:
            seen[name] = (seen.get(name, (t, t))[0], t)
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--warmup-minutes", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--mode", default="disaggregated")
    p.add_argument(
        "--think-s",
        type=float,
        default=0.0,
        help="mean pause of a client between requests (exponential): a load under capacity",
    )
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="each worker's KV pool")
    p.add_argument("--sample-s", type=float, default=10)
    p.add_argument("--worker-lease-s", type=float, default=30.0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    model_dir = common.resolve_model_dir(None)
    vocab_size = common.load_config(model_dir)["vocab_size"]
    keys = Path(tempfile.mkdtemp()) / "keys.yaml"
    # A quota the mix exceeds now and then, so refusals are part of the soak.
    keys.write_text(f"keys:\n  - {{name: soak, key: {KEY}, requests_per_minute: 240}}\n")
    extra = ["--api-keys", str(keys), "--request-timeout-s", "60"]
    # On a shared, loaded host a worker can stall for seconds; declared dead, it would be
    # restarted and the memory being measured would start over.
    extra += ["--worker-lease-s", str(args.worker_lease_s)]
    extra += ["--kv-cache-memory-gib", str(args.kv_cache_gib)]  # the last one counts
    server = Server("soak", extra, threads=1, mode=args.mode)
    workload = {k: v for k, v in vars(args).items() if k != "json_out"}
    common.print_header(
        "Soak: RSS under steady load",
        {
            "hardware": common.hardware_info(),
            "model": common.model_info(model_dir),
            "workload": workload,
            "server": {"command": server.command},
        },
    )
    samples: list = []
    counts: dict[str, int] = {}
    try:
        server.wait_ready()
        end = time.monotonic() + args.minutes * 60

        async def run() -> None:
            users = [
                client(server.url, end, vocab_size, seed, counts, args.think_s)
                for seed in range(args.concurrency)
            ]
            await asyncio.gather(sample(server.proc.pid, end, args.sample_s, samples), *users)

        asyncio.run(run())
    finally:
        server.stop()
    result = summarise(samples, args.warmup_minutes * 60)
    print(f"requests by outcome: {dict(sorted(counts.items()))}")
    end_s = samples[-1][0] if samples else 0.0
    for name, (first, last) in lifetimes(samples).items():
        if first > 0 or last < end_s:  # a worker that died or was restarted mid-run
            print(f"{name}: sampled from {first / 60:.1f} to {last / 60:.1f} min")
    events = [line for line in server.log if any(w in line for w in ("dead", "died", "restart"))]
    print("\n".join(["server log (worker deaths and restarts):", *events]) if events else "")
    rows = [
        [
            name,
            field,
            f"{r['warm_mib']:.0f}",
            f"{r['end_mib']:.0f}",
            f"{r['growth'] * 100:+.1f} %",
            f"{r['slope_mib_per_min']:+.2f}",
        ]
        for name, parts in result.items()
        for field, r in parts.items()
    ]
    head = ["process", "measure", "after warm-up MiB", "at end MiB", "growth", "MiB/min"]
    print(common.format_table(head, rows))
    for field in ("VmRSS", "RssAnon"):
        worst = max((p[field]["growth"] for p in result.values() if field in p), default=0.0)
        print(f"worst {field} growth {worst * 100:+.1f} % (goal within {GOAL_GROWTH * 100:.0f} %)")
    common.write_json(
        args.json_out, {"workload": workload, "counts": counts, "rss": result, "samples": samples}
    )
    return 0


def summarise(samples: list, warmup_s: float) -> dict:
    """Per process and measure (VmRSS, RssAnon, ...): median of the samples in the minute
    after warm-up and in the last minute (a median, so one sample caught mid-allocation does
    not decide)."""
    result: dict[str, dict] = {}
    names = lifetimes(samples)
    end_s = samples[-1][0] if samples else 0
    for name in names:
        for field in FIELDS:
            warm = [
                s[name][field] for t, s in samples if warmup_s <= t < warmup_s + 60 and name in s
            ]
            last = [s[name][field] for t, s in samples if t >= end_s - 60 and name in s]
            if warm and last:
                w, e = sorted(warm)[len(warm) // 2], sorted(last)[len(last) // 2]
                growth = e / w - 1 if w else 0.0
                after = [(t, s[name][field]) for t, s in samples if t >= warmup_s and name in s]
                result.setdefault(name, {})[field] = {
                    "warm_mib": w,
                    "end_mib": e,
                    "growth": growth,
                    "slope_mib_per_min": slope(after) * 60,
                }
    return result


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points: MiB per second (0 for fewer than 2)."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


if __name__ == "__main__":
    sys.exit(main())
