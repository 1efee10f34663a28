"""Builders for fault-injection tests against a real `pdserve serve`: concurrent streams
whose every chunk is recorded, worker pids by id, and the router's migration counter."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx2 as httpx

from tests.serving.server import ServerProcess

ADMIN_KEY = "test-admin-key"


@dataclass
class Stream:
    """One streamed completion: its text deltas in order, usage, and any error event."""

    prompt: str
    chunks: list[str] = field(default_factory=list)  # every choice's deltas, as they came
    by_choice: dict[int, list[str]] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    completion_tokens: int | None = None
    error: dict | None = None
    status_code: int | None = None

    @property
    def text(self) -> str:
        """Each choice's text, in choice order (one choice: its text)."""
        return "\x00".join("".join(self.by_choice[i]) for i in sorted(self.by_choice))

    @property
    def finish_reason(self) -> str | None:
        reasons = set(self.finish_reasons.values())
        return reasons.pop() if len(reasons) == 1 else None


def run_stream(url: str, prompt: str, max_tokens: int, stream: Stream, **params) -> None:
    try:
        _run_stream(url, prompt, max_tokens, stream, **params)
    except httpx.HTTPError as e:  # the server went away (a test killed it)
        stream.error = {"message": repr(e), "type": "connection"}


def _run_stream(url: str, prompt: str, max_tokens: int, stream: Stream, **params) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **params,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        stream.status_code = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                stream.error = event["error"]
                continue
            for choice in event.get("choices", []):
                text = choice.get("text", "")
                stream.chunks.append(text)
                stream.by_choice.setdefault(choice["index"], []).append(text)
                if choice.get("finish_reason"):
                    stream.finish_reasons[choice["index"]] = choice["finish_reason"]
            if event.get("usage"):
                stream.completion_tokens = event["usage"]["completion_tokens"]


def run_streams(url: str, prompts: list[str], max_tokens: int, **params) -> list[Stream]:
    """Start every stream at once; returns (streams, threads) still running."""
    streams = [Stream(p) for p in prompts]
    threads = [
        threading.Thread(target=run_stream, args=(url, p, max_tokens, s), kwargs=params)
        for p, s in zip(prompts, streams, strict=True)
    ]
    for t in threads:
        t.start()
    return streams, threads


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def worker_pid(server: ServerProcess, worker_id: str) -> int:
    (pid,) = server.worker_pids(worker_id)
    return pid


def freeze_busiest(
    server: ServerProcess, pids: dict[str, int], settle_s: float = 0.3
) -> str | None:
    """SIGSTOP every worker in `pids` (worker id -> pid) and, once the router has read what
    they sent before stopping, return the one still holding the most requests, left
    stopped: its requests cannot finish now, so killing it must migrate some. The others
    are resumed; so are all (and None returned) when none holds any. A kill timed on "the
    router said it holds some" alone can land after the last one left and move nothing."""
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    time.sleep(settle_s)
    state = workers(server)
    held = {w: state.get(w, {}).get("num_requests", 0) for w in pids}
    busiest = max(held, key=held.get)
    chosen = busiest if held[busiest] > 0 else None
    for worker, pid in pids.items():
        if worker != chosen:
            os.kill(pid, signal.SIGCONT)
    return chosen


def admin(server: ServerProcess, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, server.url + path, headers=headers, timeout=120, **kwargs)


def workers(server: ServerProcess) -> dict[str, dict]:
    return {w["worker_id"]: w for w in admin(server, "GET", "/admin/workers").json()["workers"]}


def counter(server: ServerProcess, name: str) -> float:
    """A metric's value summed over its label sets."""
    text = httpx.get(server.url + "/metrics").text
    matches = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    return sum(float(v) for v in matches)


def prompts(n: int, words: int = 40) -> list[str]:
    """Distinct prompts of about `words` words each."""
    vocab = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [" ".join(vocab[(i * 7 + j * 3 + j // 5) % 8] for j in range(words)) for i in range(n)]
