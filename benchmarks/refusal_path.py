"""Refusals at once: the HTTP protocol's fast path against the ASGI path, side by side.

The router's app (`build_app`, the real gateway with `max_queued_requests 1`) on uvicorn
and uvloop, as `pdserve serve` runs it, in a child process, with an engine that never
answers (the test suite's scripted fake: no worker shares the cores), one request parked
so the queue is full. Each protocol in turn (`fast`: `gateway/fast_http.py`, what
`pdserve serve` uses; `asgi`: uvicorn's plain httptools protocol, the edge in ASGI)
takes raw-socket bursts (`raw_burst.py`) of N requests written at once, on connections
opened beforehand and on connections opened at burst time. Each refusal's latency runs
from the client's write of *that* request's bytes to the last byte of its answer; the
CPU each side spent per request comes from getrusage (client) and /proc (server).

    python benchmarks/refusal_path.py [--at-once 500,1000,2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import common
import raw_burst

BODY = json.dumps({"prompt": [5] * 256, "max_tokens": 32, "stream": True}).encode()


def serve(protocol: str, port: int) -> None:
    """The child: the app on 127.0.0.1:port until killed."""
    import uvicorn
    import uvloop

    from pdserve.model.builtin import ensure_builtin_model
    from pdserve.router.app import build_app
    from pdserve.router.gateway import GatewayConfig
    from pdserve.router.gateway.fast_http import fast_refusal_protocol
    from pdserve.tokenizer import Tokenizer
    from tests.router.fakes import ScriptedEngineClient

    tokenizer = Tokenizer.from_pretrained(ensure_builtin_model(progress=False))
    client = ScriptedEngineClient(tokenizer, [], hang=True)
    app = build_app(client, gateway=GatewayConfig(max_queued_requests=1))
    http = fast_refusal_protocol(app.edge) if protocol == "fast" else "httptools"
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=http, lifespan="off", log_level="warning"
    )
    config.backlog = 4096
    uvloop.run(uvicorn.Server(config).serve())


def start(protocol: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", protocol, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            park = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.2)
    else:
        raise RuntimeError(f"{protocol} server did not start")
    park.sendall(raw_burst.request_bytes("/v1/completions", BODY))  # fills the queue
    time.sleep(1.0)
    proc.parked = park  # type: ignore[attr-defined]
    return proc, port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(protocol: str, sizes: list[int], repeats: int) -> list[dict]:
    proc, port = start(protocol)
    request = raw_burst.request_bytes("/v1/completions", BODY)
    rows = []
    try:
        raw_burst.burst(port, 200, request, "before", proc.pid)  # warm-up
        for n in sizes:
            for connect in ("before", "during"):
                runs = [
                    raw_burst.burst(port, n, request, connect, proc.pid) for _ in range(repeats)
                ]
                rows.append({"protocol": protocol, "n": n, "connect": connect, **median(runs)})
                time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    return rows


def median(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    out = {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in keys}
    statuses: dict[str, int] = {}
    for r in runs:
        for status, count in r["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + count
    return {**out, "statuses": statuses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--at-once", default="500,1000,2000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    sizes = [int(n) for n in args.at_once.split(",")]
    load0 = common.machine_load()
    rows = measure("fast", sizes, args.repeats) + measure("asgi", sizes, args.repeats)
    common.print_header(
        "Refusals at once: fast path vs ASGI",
        {"hardware": common.hardware_info(), "load": {"before": load0}},
    )
    headers = ["protocol", "N", "connect", "p50 ms", "p99 ms", "max ms", "server us/req"]
    headers += ["client us/req", "statuses"]
    table = [
        [
            r["protocol"],
            r["n"],
            r["connect"],
            r["refused_p50_ms"],
            r["refused_p99_ms"],
            r["refused_max_ms"],
            r["server_cpu_us_per_request"],
            r["client_cpu_us_per_request"],
            r["statuses"],
        ]
        for r in rows
    ]
    print(common.format_table(headers, table))
    print(f"load average after: {common.machine_load():.2f}")
    common.write_json(args.json_out, {"rows": rows})


if __name__ == "__main__":
    main()
