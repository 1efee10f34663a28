"""Refusals at once: where a burst's time goes, and the router's set-up before vs after.

The router's app (`build_app`, the real gateway, `max_queued_requests 1` with one request
admitted so the queue is full) on uvicorn and uvloop in a child process, with an engine
that never answers (the test suite's scripted fake: no worker shares the cores). Variants,
each its own child, all started at once and measured in turn (burst by burst, so load on
the shared host drifts over all of them alike):

- `before`: as `pdserve serve` ran it up to commit 60e102f: the HTTP protocol's fast path
  (`gateway/fast_http.py`), uvicorn's default backlog of 2048, the collector untouched.
- `after`: as `pdserve serve` runs it now: the same protocol, `ServeConfig.backlog`, the
  start-up objects frozen out of the collector and young collections spaced further
  apart (`router/heap.py`).
- `freeze`: `after` with CPython's default collection threshold (700): the freeze alone.
- `asgi`: uvicorn's plain httptools protocol (the edge in ASGI), the `before` set-up.

Bursts (`raw_burst.py`) of N requests written at once, on connections opened beforehand
(`before`) or at burst time (`during`, so the accept is included). Per refusal, times on
one clock (CLOCK_MONOTONIC in both processes): the client's write of that request, the
server's first read of it and its write of the 429 (an instrumented protocol subclass,
~1 us a request), the client's read of the last byte. So the client's latency splits
into the wait for the server (`server p99`: write of the 429 - client's write), of which
the refusal itself (`read -> 429`: first read to write), and the client's own lag (its
read - the server's write). Also per burst: time in the server's garbage collector, its CPU per
request (from /proc), the client's CPU per request, and the kernel's listen-queue
overflows (`ListenOverflows`: each is a SYN dropped and retried after 1 s).

`--pin`: each server on CPU 0 and the client on CPU 1 (`sched_setaffinity`), so that on
a 2-core host the router has a core of its own instead of sharing both with the load
generator (other processes still run anywhere).

    python benchmarks/refusal_path.py [--at-once 500,1000,2000,4000] [--repeats 3]
        [--variants before,after] [--pin]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import raw_burst

BODY = json.dumps({"prompt": [5] * 256, "max_tokens": 32, "stream": True}).encode()
BEFORE_BACKLOG = 2048  # uvicorn's default, pdserve's until this change
VARIANTS = ("before", "after", "freeze", "asgi")


# ----------------------------------------------------------------------------- the child


SERVER_CPU, CLIENT_CPU = 0, 1  # with --pin


def serve(variant: str, port: int, dump: str, pin: bool) -> None:
    """The child: the app on 127.0.0.1:port until killed; SIGUSR1 writes what it timed
    since the last SIGUSR1 to `dump`."""
    if pin:
        os.sched_setaffinity(0, {SERVER_CPU})
    import asyncio
    import gc

    import uvicorn
    import uvloop

    from pdserve.model.builtin import ensure_builtin_model
    from pdserve.router.app import build_app
    from pdserve.router.gateway import GatewayConfig
    from pdserve.router.gateway.fast_http import fast_refusal_protocol
    from pdserve.router.heap import freeze_startup_objects
    from pdserve.serve_config import ServeConfig
    from pdserve.tokenizer import Tokenizer
    from tests.router.fakes import ScriptedEngineClient

    tokenizer = Tokenizer.from_pretrained(ensure_builtin_model(progress=False))
    app = build_app(
        ScriptedEngineClient(tokenizer, [], hang=True),
        gateway=GatewayConfig(max_queued_requests=1),
    )
    app.edge.gateway.admission.admit("parked", 256)  # the queue is full from here on
    base = fast_refusal_protocol(app.edge) if variant != "asgi" else None
    backlog = BEFORE_BACKLOG if variant in ("before", "asgi") else ServeConfig().backlog
    if variant == "after":
        freeze_startup_objects()
    elif variant == "freeze":
        freeze_startup_objects(gen0_threshold=gc.get_threshold()[0])
    timed, gc_time = timed_protocol(base), collector_timer(gc)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=timed, lifespan="off", log_level="warning"
    )
    config.backlog = backlog

    def write_dump() -> None:
        Path(dump).write_text(json.dumps({"refused": timed.records, **gc_time}))
        timed.records.clear()
        gc_time.update(gc_s=0.0, collections=[0, 0, 0])

    async def main() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, write_dump)
        await uvicorn.Server(config).serve()

    uvloop.run(main())


def timed_protocol(base):
    """`base` (None: uvicorn's httptools protocol) recording, per refusal, (client port,
    first read, write of the answer) on `perf_counter`."""
    from time import perf_counter
    from typing import ClassVar

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Timed(base or HttpToolsProtocol):
        records: ClassVar[list] = []
        read_at: float | None = None

        def data_received(self, data: bytes) -> None:
            if self.read_at is None:
                self.read_at = perf_counter()
            super().data_received(data)

        def on_response_complete(self) -> None:  # after the 429's bytes went to the transport
            super().on_response_complete()
            self.records.append((self.client[1], self.read_at, perf_counter()))
            self.read_at = None

    return Timed


def collector_timer(gc) -> dict:
    """Time spent in the garbage collector, by `gc.callbacks`."""
    from time import perf_counter

    state = {"gc_s": 0.0, "collections": [0, 0, 0], "start": 0.0}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            state["start"] = perf_counter()
        else:
            state["gc_s"] += perf_counter() - state["start"]
            state["collections"][info["generation"]] += 1

    gc.callbacks.append(on_gc)
    return state


# ----------------------------------------------------------------------------- the client


class Server:
    def __init__(self, variant: str, workdir: str, pin: bool) -> None:
        self.variant, self.port = variant, free_port()
        self.dump = os.path.join(workdir, f"{variant}.json")
        cmd = [sys.executable, __file__, "--serve", variant, "--port", str(self.port)]
        cmd += ["--pin"] if pin else []
        env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}
        self.proc = subprocess.Popen([*cmd, "--dump", self.dump], env=env)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port)).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.variant} server did not start")

    def take_dump(self) -> dict:
        os.unlink(self.dump) if os.path.exists(self.dump) else None
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.dump) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # written in one go, but let the write finish
        return json.loads(Path(self.dump).read_text())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen_overflows() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        fields = dict(zip(names.split()[1:], values.split()[1:], strict=True))
        if "ListenOverflows" in fields:
            return int(fields["ListenOverflows"])
    return 0


def one_burst(server: Server, n: int, connect: str) -> dict:
    request = raw_burst.request_bytes("/v1/completions", BODY)
    server.take_dump()  # start the server's records afresh
    overflows0, kept = listen_overflows(), []
    row = raw_burst.burst(server.port, n, request, connect, server.proc.pid, keep=kept)
    row["listen_overflows"] = listen_overflows() - overflows0
    dump = server.take_dump()
    timed = {port: (read, wrote) for port, read, wrote in dump["refused"]}
    joined = [
        (sent, *timed[port], done)
        for port, sent, done, status in kept
        if status in raw_burst.REFUSALS and port in timed
    ]
    server_ms = sorted((wrote - sent) * 1000 for sent, _, wrote, _ in joined)
    row["server_p50_ms"], row["server_p99_ms"] = pct(server_ms, 50), pct(server_ms, 99)
    row["refusal_p99_ms"] = pct(sorted((w - r) * 1000 for _, r, w, _ in joined), 99)
    row["client_lag_p99_ms"] = pct(sorted((d - w) * 1000 for _, _, w, d in joined), 99)
    row["gc_ms"], row["collections"] = dump["gc_s"] * 1000, dump["collections"]
    return row


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def measure(variants: list[str], sizes: list[int], repeats: int, pin: bool) -> list[dict]:
    rows: list[dict] = []
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    with tempfile.TemporaryDirectory() as workdir:
        servers = [Server(v, workdir, pin) for v in variants]
        try:
            for server in servers:
                server.wait_ready()
                raw_burst.burst(server.port, 200, raw_burst.request_bytes("/v1/completions", BODY))
            for n in sizes:
                for connect in ("before", "during"):
                    runs: dict[str, list[dict]] = {v: [] for v in variants}
                    for _ in range(repeats):
                        for server in servers:  # interleaved: drift hits every variant
                            runs[server.variant].append(one_burst(server, n, connect))
                            time.sleep(0.3)
                    for v in variants:
                        rows.append({"variant": v, "n": n, "connect": connect, **median(runs[v])})
        finally:
            for server in servers:
                server.stop()
    return rows


def median(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    out = {}
    for k in keys:
        values = [r[k] for r in runs if r[k] is not None]
        out[k] = statistics.median(values) if values else None
    statuses: dict[str, int] = {}
    for r in runs:
        for status, count in r["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + count
    return {**out, "statuses": statuses, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--at-once", default="500,1000,2000,4000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="before,after")
    p.add_argument("--pin", action="store_true", help="servers on CPU 0, the client on CPU 1")
    p.add_argument("--json-out")
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.dump, args.pin)
        return
    sizes = [int(n) for n in args.at_once.split(",")]
    variants = args.variants.split(",")
    load0 = common.machine_load()
    rows = measure(variants, sizes, args.repeats, args.pin)
    common.print_header(
        "Refusals at once: before vs after",
        {"hardware": common.hardware_info(), "load": {"before": load0}, "pin": {"on": args.pin}},
    )
    print(common.format_table(*table(rows)))
    print(f"load average after: {common.machine_load():.2f}")
    common.write_json(args.json_out, {"rows": rows})


def table(rows: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["variant", "N", "connect", "client p50 ms", "client p99 ms", "server p50 ms"]
    headers += ["server p99 ms", "read -> 429 p99 ms", "client lag p99 ms", "GC ms"]
    headers += ["listen overflows", "server us/req", "client us/req", "statuses"]
    keys = ["variant", "n", "connect", "refused_p50_ms", "refused_p99_ms", "server_p50_ms"]
    keys += ["server_p99_ms", "refusal_p99_ms", "client_lag_p99_ms", "gc_ms"]
    keys += ["listen_overflows", "server_cpu_us_per_request", "client_cpu_us_per_request"]
    keys += ["statuses"]
    body = [[r[k] for k in keys] for r in rows]
    return headers, body


if __name__ == "__main__":
    main()
