"""Chaos run: workers killed at random under steady streaming load; nothing may be lost.

A real `pdserve serve` (default: disaggregated, 1 prefill + 2 decode workers, one thread
each, batch-invariant so every output has one right answer) serves a steady closed loop
of streaming greedy requests over a pool of prompts whose undisturbed outputs are taken
first. Every `--kill-every-s` (± 50 %) a random live worker gets SIGKILL; the launcher
restarts it with backoff. At the end the run reports:

- requests lost (any error or missing token; goal 0) and requests whose text differs
  from the undisturbed one (a token lost, duplicated or changed; goal 0);
- migrations, and the resume delay of a migrated stream (first token after the kill),
  next to the normal inter-token latency;
- tokens a resumed request needed in KV on its new worker vs those served from its cache;
- KV blocks still held once the server is idle (goal 0).

    python benchmarks/chaos.py [--duration-s 180] [--kill-every-s 6] [--concurrency 6]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

ADMIN_KEY = "chaos-admin"


def start_redis() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc, port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.port, self.router_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.router_addr = f"tcp://127.0.0.1:{self.router_port}"
        cmd = [
            sys.executable, "-m", "pdserve.cli", "serve",
            "--port", str(self.port), "--router-port", str(self.router_port),
            "--log-level", "WARNING", "--admin-key", ADMIN_KEY,
            "--mode", args.mode,
            "--prefill-workers", str(args.prefill_workers),
            "--decode-workers", str(args.decode_workers),
            "--mixed-workers", str(args.mixed_workers),
            "--threads-per-worker", "1",
            "--max-migrations", str(args.max_migrations),
        ]  # fmt: skip
        if args.batch_invariant:
            cmd.append("--batch-invariant")
        if args.kv_redis_url:
            cmd += ["--kv-redis-url", args.kv_redis_url]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("pdserve ready"):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300):
            self.stop()
            raise SystemExit("server not ready:\n" + "".join(self.lines[-30:]))

    def worker_pids(self) -> dict[str, int]:
        """The server's worker children by id (`worker --spec DIR/<id>.json`)."""
        pids = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = [
                    a.decode(errors="replace")
                    for a in (entry / "cmdline").read_bytes().split(b"\0")
                ]
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == self.proc.pid and "--spec" in args:
                pids[Path(args[args.index("--spec") + 1]).stem] = int(entry.name)
        return pids

    def admin_workers(self) -> dict[str, dict]:
        import httpx2 as httpx

        r = httpx.get(self.url + "/admin/workers", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        return {w["worker_id"]: w for w in r.json()["workers"]}

    def counter(self, name: str) -> float:
        import httpx2 as httpx

        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class Result:
    prompt_index: int
    start: float
    response_id: str | None = None
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    completion_tokens: int | None = None
    error: str | None = None


def stream_one(url: str, prompt: str, max_tokens: int, result: Result) -> None:
    import httpx2 as httpx

    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"]["message"]
                    continue
                result.response_id = result.response_id or event.get("id")
                for choice in event.get("choices", []):
                    result.text += choice.get("text", "")
                    result.chunk_times.append(time.monotonic())
                if event.get("usage"):
                    result.completion_tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # a broken connection is a lost request too
        result.error = repr(e)
    finally:
        result.end = time.monotonic()


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "theta",
        "kappa",
        "lambda",
        "sigma",
        "omega",
    ]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def load_loop(server: Server, prompts, args, results: list[Result], stop: threading.Event, rng):
    while not stop.is_set():
        index = rng.randrange(len(prompts))
        result = Result(index, time.monotonic())
        results.append(result)
        stream_one(server.url, prompts[index], args.max_tokens, result)


def killer(server: Server, args, kills: list[tuple[float, str]], stop: threading.Event, rng):
    while not stop.wait(args.kill_every_s * rng.uniform(0.5, 1.5)):
        serving = [w for w, info in server.admin_workers().items() if info["state"] == "serving"]
        pids = server.worker_pids()
        candidates = [w for w in serving if w in pids]
        if len(candidates) < 2:  # keep one of each role pool from all dying at once
            continue
        victim = rng.choice(candidates)
        os.kill(pids[victim], signal.SIGKILL)
        kills.append((time.monotonic(), victim))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


MOVED = re.compile(r"moving (\S+) \((\d+) tokens generated\)")


def moved_requests(lines: list[str]) -> set[str]:
    """Response ids of the requests the router logged as moved (`cmpl-x-0` -> `cmpl-x`)."""
    ids = set()
    for line in lines:
        match = MOVED.search(line)
        if match:
            ids.add(match.group(1).split("#")[0].rsplit("-", 1)[0])
    return ids


def gaps(r: Result) -> list[float]:
    return [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]


def analyse(results, expected, kills, args, moved: set[str]) -> dict:
    done = [r for r in results if r.end]
    lost = [r for r in done if r.error or r.completion_tokens != args.max_tokens]
    changed = [r for r in done if not r.error and r.text != expected[r.prompt_index]]
    all_gaps = [g for r in done if r.response_id not in moved for g in gaps(r)]
    # A moved stream's longest pause: from its last token on the lost worker to its
    # first from the new one (death detection + re-admission + replay prefill).
    stalls = [max(gaps(r), default=0.0) for r in done if r.response_id in moved]
    return {
        "requests": len(done),
        "requests_lost": len(lost),
        "requests_changed": len(changed),
        "lost_examples": [r.error for r in lost[:3]],
        "changed_examples": [(expected[r.prompt_index][:80], r.text[:80]) for r in changed[:2]],
        "kills": len(kills),
        "requests_moved": sum(r.response_id in moved for r in done),
        "moved_stall_p50_s": percentile(stalls, 50),
        "moved_stall_p99_s": percentile(stalls, 99),
        "itl_p50_s (not moved)": percentile(all_gaps, 50),
        "itl_p99_s (not moved)": percentile(all_gaps, 99),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="disaggregated")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--mixed-workers", type=int, default=0)
    p.add_argument("--duration-s", type=float, default=180.0)
    p.add_argument("--kill-every-s", type=float, default=6.0)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=80)
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-migrations", type=int, default=8)
    p.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false")
    p.add_argument(
        "--redis",
        action="store_true",
        help="start a redis-server and give the workers a shared Redis KV tier, so a "
        "replay finds the blocks its old worker computed",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    common.print_header(
        "Chaos: random SIGKILLs under streaming load",
        {"hardware": common.hardware_info(), "workload": vars(args)},
    )
    redis = start_redis() if args.redis else None
    args.kv_redis_url = f"redis://127.0.0.1:{redis[1]}/0" if redis else None
    server = Server(args)
    rng = random.Random(args.seed)
    try:
        prompts = make_prompts(args.num_prompts, args.prompt_words, args.seed)
        expected = []
        for prompt in prompts:  # undisturbed outputs, one at a time
            result = Result(0, time.monotonic())
            stream_one(server.url, prompt, args.max_tokens, result)
            assert result.error is None, result.error
            expected.append(result.text)
        before = {
            name: server.counter(f"pdserve:{name}_total")
            for name in (
                "request_migrations",
                "migration_replay_tokens",
                "migration_replay_cached_tokens",
            )
        }
        results: list[Result] = []
        kills: list[tuple[float, str]] = []
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=load_loop, args=(server, prompts, args, results, stop, random.Random(i))
            )
            for i in range(args.concurrency)
        ]
        threads.append(threading.Thread(target=killer, args=(server, args, kills, stop, rng)))
        for t in threads:
            t.start()
        time.sleep(args.duration_s)
        stop.set()
        for t in threads:
            t.join(600)
        report = analyse(results, expected, kills, args, moved_requests(server.lines))
        for name, value in before.items():
            report[name] = server.counter(f"pdserve:{name}_total") - value
        replay = report["migration_replay_tokens"]
        report["replay_cached_fraction"] = (
            report["migration_replay_cached_tokens"] / replay if replay else None
        )
        time.sleep(3.0)  # let the restarted workers report their idle pools
        held = {
            w: info["num_blocks"] - info["num_free_blocks"]
            for w, info in server.admin_workers().items()
            if info["state"] == "serving" and info["num_blocks"] is not None
        }
        report["blocks_held_when_idle"] = sum(held.values())
        examples = ("lost_examples", "changed_examples")
        rows = [[k, v] for k, v in report.items() if k not in examples]
        print(common.format_table(["measure", "value"], rows))
        for name in examples:
            if report[name]:
                print(f"{name}:", report[name])
        common.write_json(args.json_out, {"args": vars(args), "report": report, "kills": kills})
        ok = report["requests_lost"] == 0 and report["requests_changed"] == 0
        return 0 if ok and report["blocks_held_when_idle"] == 0 else 1
    finally:
        server.stop()
        if redis is not None:
            redis[0].terminate()


if __name__ == "__main__":
    raise SystemExit(main())
