"""Overload with and without SLO-aware admission: bursts of 5x and 20x capacity.

Two `pdserve serve` processes (aggregated, one mixed worker each, the same settings) run
side by side, one with `--admission-ttft-ms TARGET`, one without; only one is loaded at a
time. Steps, over real HTTP (aiohttp, streaming completions):

1. Calibrate: a closed loop of `--calib-concurrency` requests for `--calib-s` seconds on
   each server; the plain server's completions per second is the *capacity* C (the
   admission server's run warms its TTFT model).
2. Bursts: open-loop arrivals at k x C requests/s for `--burst-s` seconds (k = 5, 20),
   evenly spaced, on each server in turn; wait for every answer.
3. Connections: `--connections` idle TCP connections held open on the admission server
   (each has sent half a request header), then the 20x burst again: refusals must stay
   fast with thousands of connections open.
4. All at once: bursts of `--at-once` requests (500, 1000, 2000) written at the same
   instant from raw sockets (`raw_burst.py`, a client that costs ~10-30 us a request) to
   the admission server while a 5x open loop keeps it at its TTFT limit: new connections
   opened at burst time (the accept loop included), and once more on connections opened
   beforehand. Refusal latency p50/p99/max, and the CPU each side spent per request (the
   router's from /proc). One more burst through aiohttp shows what that client costs.

Reported per run: requests sent, accepted (completed) and shed (429); accepted TTFT
p50/p99 against the target; shed latency p50/p99 (send to 429, measured by the client,
which shares the machine); goodput = completed requests whose TTFT met the target, per
second from the first send to the last answer.

Every prompt is unique random token ids (no prefix-cache hits).

    python benchmarks/overload_admission.py [--target-ms 2000] [--prompt-tokens 256]
        [--max-tokens 32] [--burst-s 4] [--multipliers 5,20] [--connections 2000]
        [--at-once 500,1000,2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp
import common
import raw_burst


@dataclass
class Outcome:
    status: int
    sent: float  # perf_counter seconds
    first_token: float | None = None
    done: float | None = None


@dataclass
class Run:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self, target_s: float) -> dict:
        ok = [o for o in self.outcomes if o.status == 200 and o.done is not None]
        shed = [o for o in self.outcomes if o.status == 429]
        ttfts = [o.first_token - o.sent for o in ok if o.first_token is not None]
        sheds = [o.done - o.sent for o in shed if o.done is not None]
        start = min(o.sent for o in self.outcomes)
        end = max(o.done or o.sent for o in self.outcomes)
        good = sum(t <= target_s for t in ttfts)
        statuses: dict[int, int] = {}
        for o in self.outcomes:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        return {
            "run": self.name,
            "sent": len(self.outcomes),
            "accepted": len(ok),
            "shed_429": len(shed),
            "statuses": statuses,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
            "accepted_within_target": good / len(ttfts) if ttfts else None,
            "shed_p50_ms": _ms(percentile(sheds, 50)),
            "shed_p99_ms": _ms(percentile(sheds, 99)),
            "goodput_rps": good / (end - start),
            "wall_s": end - start,
        }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# -- servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, extra: list[str], threads: int, mode: str = "aggregated") -> None:
        self.name = name
        self.port = free_port()
        cmd = [
            *(sys.executable, "-m", "pdserve.cli", "serve", "--mode", mode),
            *("--port", str(self.port), "--threads-per-worker", str(threads)),
            *("--kv-cache-memory-gib", "1", "--log-level", "WARNING", *extra),
        ]
        self.command = " ".join(cmd[2:])
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.log: deque[str] = deque(maxlen=500)  # its output after "ready", last lines

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("pdserve ready"):
                # Keep reading: a full pipe would block the server's next log line.
                threading.Thread(target=self._drain, daemon=True).start()
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.name} did not start")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- load -----------------------------------------------------------------------------------


class Load:
    def __init__(self, prompt_tokens: int, max_tokens: int, vocab_size: int, seed: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)

    def body(self) -> bytes:
        prompt = [self.rng.randrange(3, self.vocab_size) for _ in range(self.prompt_tokens)]
        body = {
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        return json.dumps(body).encode()

    async def one(self, http: aiohttp.ClientSession, url: str) -> Outcome:
        outcome = Outcome(0, time.perf_counter())
        headers = {"Content-Type": "application/json"}
        try:
            async with http.post(url + "/v1/completions", data=self.body(), headers=headers) as r:
                outcome.status = r.status
                if r.status == 200:
                    async for line in r.content:
                        if outcome.first_token is None and line.startswith(b"data: {"):
                            outcome.first_token = time.perf_counter()
                else:
                    await r.read()
        except aiohttp.ClientError:
            outcome.status = -1
        outcome.done = time.perf_counter()
        return outcome


def session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def closed_loop(load: Load, url: str, concurrency: int, seconds: float) -> Run:
    run = Run("calibration")
    end = time.perf_counter() + seconds
    async with session() as http:

        async def user() -> None:
            while time.perf_counter() < end:
                outcome = await load.one(http, url)
                run.outcomes.append(outcome)
                if outcome.status != 200:
                    await asyncio.sleep(0.25)  # a refused client backs off a little

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return run


async def open_loop(load: Load, url: str, rate: float, seconds: float, name: str) -> Run:
    """`rate` x `seconds` requests, evenly spaced (rate = inf: all at once)."""
    count = int(rate * seconds) if rate != float("inf") else int(seconds)
    gap = 0.0 if rate == float("inf") else 1.0 / rate
    async with session() as http:
        start = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = start + i * gap - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(load.one(http, url)))
        return Run(name, list(await asyncio.gather(*tasks)))


# -- the experiment ---------------------------------------------------------------------------


async def experiment(args, plain: Server, gated: Server, vocab_size: int) -> dict:
    load = Load(args.prompt_tokens, args.max_tokens, vocab_size, seed=1)
    calib = await closed_loop(load, plain.url, args.calib_concurrency, args.calib_s)
    capacity = calib.summary(1e9)["accepted"] / args.calib_s
    print(f"capacity (plain, closed loop c={args.calib_concurrency}): {capacity:.2f} req/s")
    await closed_loop(load, gated.url, args.calib_concurrency, args.calib_s)  # warm the model
    target_s = args.target_ms / 1000
    summaries = []
    for k in args.multipliers:
        for server in (plain, gated):
            name = f"{k}x {server.name}"
            print(f"running {name}: {k * capacity:.1f} req/s for {args.burst_s} s ...", flush=True)
            run = await open_loop(load, server.url, k * capacity, args.burst_s, name)
            summaries.append(run.summary(target_s))
            await asyncio.sleep(2)
    k = max(args.multipliers)
    if args.connections:
        print(f"opening {args.connections} idle connections, then {k}x again ...", flush=True)
        idle = await hold_connections(gated.port, args.connections)
        run = await open_loop(load, gated.url, k * capacity, args.burst_s, f"{k}x admission")
        summary = run.summary(target_s)
        summary["run"] += f" + {args.connections} idle conns"
        summaries.append(summary)
        for writer in idle:
            writer.close()
        await asyncio.sleep(2)
    bursts = []
    plan = [(n, "during") for n in args.at_once]
    plan += [(max(args.at_once), "before")] if args.at_once else []
    for n, connect in plan:
        print(f"{n} requests at once ({connect}) on the loaded admission server ...", flush=True)
        bursts.append(await burst_on_loaded(load, gated, capacity, args.burst_s, n, connect))
    if args.at_once:
        n = min(args.at_once)
        print(f"{n} at once through aiohttp (the client's own cost) ...", flush=True)
        bursts.append(await aiohttp_burst_on_loaded(load, gated, capacity, args.burst_s, n))
    return {"capacity_rps": capacity, "runs": summaries, "bursts": bursts}


async def burst_on_loaded(
    load: Load, server: Server, capacity: float, seconds: float, n: int, connect: str
) -> dict:
    """`n` requests at once from raw sockets (`raw_burst.py`) while the server is kept at
    its TTFT limit by a 5x-capacity open loop; refusal latency and CPU per request."""
    background = asyncio.create_task(
        open_loop(load, server.url, 5 * capacity, seconds, "background")
    )
    await asyncio.sleep(1.0)  # loaded, queue at its TTFT limit
    request = raw_burst.request_bytes("/v1/completions", load.body())
    result = await asyncio.to_thread(
        raw_burst.burst, server.port, n, request, connect, server.proc.pid
    )
    await background
    return {"client": f"raw sockets, connect {connect}", **result}


async def aiohttp_burst_on_loaded(
    load: Load, server: Server, capacity: float, seconds: float, n: int
) -> dict:
    """The same burst through aiohttp, as earlier runs measured it: the client's CPU per
    request (which includes the background loop's) shows what a Python client adds."""
    background = asyncio.create_task(
        open_loop(load, server.url, 5 * capacity, seconds, "background")
    )
    await asyncio.sleep(1.0)
    server0, client0 = raw_burst.process_cpu_s(server.proc.pid), raw_burst.cpu_s()
    run = (await open_loop(load, server.url, float("inf"), n, "at once")).summary(1e9)
    client_s = raw_burst.cpu_s() - client0
    server_s = raw_burst.process_cpu_s(server.proc.pid) - server0
    await background
    return {
        "client": "aiohttp",
        "n": n,
        "statuses": run["statuses"],
        "refused_p50_ms": run["shed_p50_ms"],
        "refused_p99_ms": run["shed_p99_ms"],
        "refused_max_ms": None,
        "wall_ms": run["wall_s"] * 1000,
        "client_cpu_us_per_request": client_s / n * 1e6,
        "server_cpu_us_per_request": server_s / n * 1e6,
    }


async def hold_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections that each sent the start of a request and then nothing."""
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\n")
        writers.append(writer)
    await asyncio.sleep(0.5)
    return writers


def print_results(results: dict, target_ms: float) -> None:
    headers = ["run", "sent", "accepted", "429", "TTFT p50 s", "TTFT p99 s", "within target"]
    headers += ["shed p50 ms", "shed p99 ms", "goodput req/s"]
    rows = []
    for r in results["runs"]:
        rows.append(
            [
                r["run"],
                r["sent"],
                r["accepted"],
                r["shed_429"],
                _fmt(r["ttft_p50_s"], 2),
                _fmt(r["ttft_p99_s"], 2),
                _fmt(r["accepted_within_target"], 2),
                _fmt(r["shed_p50_ms"], 1),
                _fmt(r["shed_p99_ms"], 1),
                _fmt(r["goodput_rps"], 2),
            ]
        )
    print(f"\nTTFT target {target_ms:.0f} ms; capacity {results['capacity_rps']:.2f} req/s")
    print(common.format_table(headers, rows))
    other = {r["run"]: r["statuses"] for r in results["runs"]}
    print(f"status counts: {other}")
    headers = ["requests at once", "client", "refused p50 ms", "refused p99 ms", "max ms"]
    headers += ["client CPU us/req", "router CPU us/req", "statuses"]
    rows = [
        [
            b["n"],
            b["client"],
            _fmt(b["refused_p50_ms"], 1),
            _fmt(b["refused_p99_ms"], 1),
            _fmt(b["refused_max_ms"], 1),
            _fmt(b["client_cpu_us_per_request"], 0),
            _fmt(b["server_cpu_us_per_request"], 0),
            b["statuses"],
        ]
        for b in results["bursts"]
    ]
    print("\nBursts on the loaded admission server")
    print(common.format_table(headers, rows))


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target-ms", type=float, default=2000)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--burst-s", type=float, default=4)
    p.add_argument("--multipliers", default="5,20", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--calib-concurrency", type=int, default=16)
    p.add_argument("--calib-s", type=float, default=15)
    p.add_argument("--connections", type=int, default=2000, help="idle connections (0: skip)")
    p.add_argument(
        "--at-once",
        default=[500, 1000, 2000],
        type=lambda s: [int(x) for x in s.split(",") if int(x) > 0],
        help="sizes of simultaneous bursts, comma-separated (0: skip)",
    )
    # One torch thread leaves the second core to the router and this client on 2 cores.
    p.add_argument("--threads", type=int, default=1, help="threads of each worker")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    model_dir = common.resolve_model_dir(None)
    vocab_size = common.load_config(model_dir)["vocab_size"]
    servers = [
        Server("no admission", [], args.threads),
        Server("admission", ["--admission-ttft-ms", str(args.target_ms)], args.threads),
    ]
    workload = {k: v for k, v in vars(args).items() if k != "json_out"}
    common.print_header(
        "Overload: SLO-aware admission vs none",
        {
            "hardware": common.hardware_info(),
            "model": common.model_info(model_dir),
            "workload": workload,
            "servers": {s.name: s.command for s in servers},
        },
    )
    try:
        for server in servers:
            server.wait_ready()
        results = asyncio.run(experiment(args, servers[0], servers[1], vocab_size))
    finally:
        for server in servers:
            server.stop()
    print_results(results, args.target_ms)
    common.write_json(args.json_out, {"workload": workload, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
