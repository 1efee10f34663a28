"""A burst of HTTP requests from raw sockets: the client costs as little as a client can.

An aiohttp client spends ~0.3-1 ms of Python per request (its own HTTP parser, a task, a
response object); with the router on the same two cores that client is a large part of
what a burst measures. This one opens `n` TCP connections, writes one pre-built request
on each back to back (a `send` each) and reads the answers with one `epoll` loop that
only looks for the end of the headers and `Content-Length`, never parsing a body. It
reports the latency of refusals (429 and 503: its write to the last byte of the answer;
an accepted request's stream is read to its end but not timed), the status codes,
and what each side spent: the client's own CPU time and, given the server's pid, the
server's (from /proc), both per request.

Two ways to connect:
- `before`: all connections are open (and accepted) before the first request is written,
  as with clients that keep connections alive; the burst measures request handling.
- `during`: each connection is opened at burst time and its request written as soon as it
  connects; the burst also measures the server's accept loop.

    python benchmarks/raw_burst.py PORT N [--connect during] [--body FILE] [--pid PID]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT_S = 60.0
REFUSALS = (429, 503)  # the latencies reported are of these answers


@dataclass
class Conn:
    sock: socket.socket
    sent: float | None = None
    done: float | None = None
    data: bytearray = field(default_factory=bytearray)

    @property
    def status(self) -> int:
        return int(self.data[9:12]) if len(self.data) >= 12 else -1

    def is_complete(self) -> bool:
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.data[:end]).lower()
        if b"transfer-encoding: chunked" in head:  # an accepted stream: read to its end
            return self.data.endswith(b"\r\n0\r\n\r\n")
        at = head.find(b"content-length:")
        if at < 0:
            return False  # no length: read to the close
        length = int(head[at + 15 :].split(b"\r\n", 1)[0])
        return len(self.data) >= end + 4 + length


def request_bytes(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: bench", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (None without a pid or once it is gone)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst(
    port: int,
    n: int,
    request: bytes,
    connect: str = "before",
    pid: int | None = None,
    keep: list | None = None,
):
    """Send `n` copies of `request` at once; returns the summary dict (see `summarise`).
    `keep`: a list that receives (client port, sent, done, status) per connection, the
    times from `time.perf_counter` (CLOCK_MONOTONIC: comparable with the server's)."""
    poller = select.epoll(sizehint=n)
    conns: dict[int, Conn] = {}
    if connect == "before":
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conns[sock.fileno()] = Conn(sock)
        time.sleep(0.5)  # let the server accept them all
    server0, client0, start = process_cpu_s(pid), cpu_s(), time.perf_counter()
    if connect == "before":
        for fd, conn in conns.items():
            conn.sent = time.perf_counter()
            conn.sock.send(request)
            poller.register(fd, select.EPOLLIN)
    else:
        for _ in range(n):
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock, sent=time.perf_counter())
            if sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                conn.done = conn.sent
            conns[sock.fileno()] = conn
            poller.register(sock.fileno(), select.EPOLLOUT)
    _collect(poller, conns, request)
    client_s, wall_s = cpu_s() - client0, time.perf_counter() - start
    server1 = process_cpu_s(pid)
    server_s = server1 - server0 if server0 is not None and server1 is not None else None
    for conn in conns.values():
        if keep is not None:
            keep.append((conn.sock.getsockname()[1], conn.sent, conn.done, conn.status))
        conn.sock.close()
    return summarise(list(conns.values()), client_s, server_s, wall_s)


def _collect(poller: select.epoll, conns: dict[int, Conn], request: bytes) -> None:
    left = sum(c.done is None for c in conns.values())
    deadline = time.perf_counter() + TIMEOUT_S
    while left and time.perf_counter() < deadline:
        for fd, event in poller.poll(1.0):
            conn = conns[fd]
            if event & select.EPOLLOUT:  # connected (`during`): write the request
                if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    conn.done = time.perf_counter()
                    poller.unregister(fd)
                    left -= 1
                    continue
                conn.sock.send(request)
                poller.modify(fd, select.EPOLLIN)
                continue
            try:
                chunk = conn.sock.recv(65536)
            except ConnectionError:
                chunk = b""
            conn.data += chunk
            if not chunk or conn.is_complete():
                conn.done = time.perf_counter()
                poller.unregister(fd)
                left -= 1


def summarise(conns: list[Conn], client_s: float, server_s: float | None, wall_s: float) -> dict:
    n = len(conns)
    refused = [c for c in conns if c.done is not None and c.status in REFUSALS]
    latencies = sorted((c.done - c.sent) * 1000 for c in refused)
    statuses: dict[int, int] = {}
    for c in conns:
        key = c.status if c.done is not None else 0  # 0: no answer within the timeout
        statuses[key] = statuses.get(key, 0) + 1

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, round(q / 100 * (len(latencies) - 1)))]

    return {
        "n": n,
        "statuses": statuses,
        "refused_p50_ms": pct(50),
        "refused_p99_ms": pct(99),
        "refused_max_ms": latencies[-1] if latencies else None,
        "wall_ms": wall_s * 1000,
        "client_cpu_us_per_request": client_s / n * 1e6,
        "server_cpu_us_per_request": None if server_s is None else server_s / n * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("port", type=int)
    p.add_argument("n", type=int)
    p.add_argument("--connect", choices=("before", "during"), default="before")
    p.add_argument("--body", help="file with the JSON body (default: a 3-token prompt)")
    p.add_argument("--path", default="/v1/completions")
    p.add_argument("--pid", type=int, help="the server's pid, for its CPU time")
    args = p.parse_args(argv)
    body = Path(args.body).read_bytes() if args.body else b'{"prompt": [1, 2, 3]}'
    result = burst(args.port, args.n, request_bytes(args.path, body), args.connect, args.pid)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
