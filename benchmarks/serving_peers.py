"""Serving throughput at fixed concurrency: pdserve vs llama.cpp's `llama-server` vs
`transformers serve`, same model, same machine, same client, same requests.

Each server is started on this machine in turn, warmed up, then driven by `pdserve bench`'s
load generator in closed loop at each concurrency (requests in flight at all times, fresh
prompts at every level so no server answers from its prefix cache), with
`ignore_eos` so every request produces its full `max_tokens` where the server honours it.
Token counts come from each server's `usage`. The table reports output tokens/s, TTFT p50
and p99, TPOT p50 and p99, and pdserve's ratios against each peer at each concurrency:
the issue's goal is pdserve ≥ 1.0x llama-server and ≥ 5x transformers serve at
concurrency 32, at equal or better p99 TTFT.

Peers (built outside the repository, see benchmarks/peers/README.md):
- `llama-server -np 32` on the built-in model converted to GGUF (f32, like pdserve's
  weights), `-t 2` threads, continuous batching (its default);
- `transformers serve --continuous-batching` from the peers venv.
A peer that is not built is skipped with a note.

    python benchmarks/serving_peers.py [--concurrency 1,8,32] [--servers pdserve-aggregated,...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import common

from pdserve.bench.launcher import ServeProcess, free_port
from pdserve.bench.loadgen import Arrival, run_benchmark_sync
from pdserve.bench.metrics import summarize
from pdserve.bench.workloads import get_workload
from pdserve.tokenizer import Tokenizer

LLAMA_GOAL = 1.0  # pdserve / llama-server output tokens/s at concurrency 32
TRANSFORMERS_GOAL = 5.0  # pdserve / transformers serve

PDSERVE_CONFIGS = {
    "pdserve-aggregated": {
        "mode": "aggregated",
        "mixed_workers": 1,
        "threads_per_worker": 2,
        "engine": {"kv_cache_memory_gib": 2.0},  # default chunk: 2048 tokens per step
    },
    # Two single-thread engines instead of one two-thread engine: their Python and other
    # serial parts run side by side, and no product waits for a second thread.
    "pdserve-aggregated-2x1": {
        "mode": "aggregated",
        "mixed_workers": 2,
        "threads_per_worker": 1,
        "engine": {"kv_cache_memory_gib": 1.0},
    },
    "pdserve-disaggregated": {
        "mode": "disaggregated",
        "prefill_workers": 1,
        "decode_workers": 1,
        "threads_per_worker": 1,
        "engine": {"kv_cache_memory_gib": 2.0},
    },
    "pdserve-auto": {
        "mode": "auto",
        "prefill_workers": 1,
        "decode_workers": 1,
        "threads_per_worker": 1,
        "engine": {"kv_cache_memory_gib": 2.0},
    },
}
# The same as pdserve-aggregated with decode steps layer by layer through PyTorch instead of
# one C call (kernels/decode_step.c): the fused step's effect, side by side (not in the default).
PDSERVE_CONFIGS["pdserve-aggregated-unfused"] = PDSERVE_CONFIGS["pdserve-aggregated"]
# And with the gemv kernel's weight prefetch forced to prefetchnta (the default on AMD; on
# Intel the default is prefetcht0, kernels.prefetch_locality): the hint's effect when serving.
PDSERVE_CONFIGS["pdserve-aggregated-nta"] = PDSERVE_CONFIGS["pdserve-aggregated"]
PDSERVE_ENV = {
    "pdserve-aggregated-unfused": {"PDSERVE_FUSED_DECODE": "0"},
    "pdserve-aggregated-nta": {"PDSERVE_PREFETCH_LOCALITY": "0"},
}
PEERS = ("llama-server", "transformers-serve")


class CommandServer:
    """A peer server run as a command; ready once GET `ready_path` answers 200."""

    def __init__(
        self, cmd: list[str], port: int, log_path: Path, ready_path: str, env=None
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response,
            ):
                if response.status == 200:
                    return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def start_server(name: str, model_dir: Path, log_dir: Path, context: int, specs):
    """(server, model id, extra request body) or None when the peer is not built."""
    log_path = log_dir / f"{name}.log"
    if name in PDSERVE_CONFIGS:
        settings = {"model": str(model_dir), **PDSERVE_CONFIGS[name]}
        server = ServeProcess(settings, log_path=log_path, env=PDSERVE_ENV.get(name))
        return server, None, {"ignore_eos": True, "temperature": 0.0}
    port = free_port()
    if name == "llama-server":
        binary = common.llamacpp_bin("llama-server")
        gguf = common.gguf_for(model_dir, "f32") if binary else None
        if binary is None or gguf is None:
            return None
        cmd = [
            str(binary), "-m", str(gguf), "-np", "32", "-c", str(32 * context), "-t", "2",
            "-tb", "2", "--host", "127.0.0.1", "--port", str(port), "--no-webui",
        ]  # fmt: skip
        extra = {"ignore_eos": True, "temperature": 0.0}
        return CommandServer(cmd, port, log_path, "/health"), None, extra
    if name == "transformers-serve":
        binary = common.PEERS_DIR / "venv" / "bin" / "transformers"
        if not binary.exists():
            return None
        # --cb-num-blocks 128: 32k tokens of KV (256-token blocks), like llama-server's -c;
        # by default it takes 60 % of RAM.
        cmd = [
            str(binary), "serve", "--continuous-batching", "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--dtype", "float32",
            "--cb-num-blocks", "128", str(model_dir),
        ]  # fmt: skip
        env = {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
        server = CommandServer(cmd, port, log_path, "/v1/models", env)
        # It rejects unknown fields (ignore_eos: 422); a fixed output length is asked for
        # through its generation_config (a JSON string), which needs equal max_tokens.
        lengths = {s.max_tokens for s in specs}
        if len(lengths) != 1:
            raise SystemExit("transformers serve needs a workload with one output length")
        (n,) = lengths
        config = json.dumps({"min_new_tokens": n, "max_new_tokens": n})
        return server, str(model_dir), {"temperature": 0.0, "generation_config": config}
    raise SystemExit(f"unknown server {name!r}")


def measure(server, model: str | None, extra_body, specs, levels, num_requests, warmup: int):
    from pdserve.bench.loadgen import fetch_model_id

    model = model or fetch_model_id(server.url)
    run_benchmark_sync(
        server.url, model, specs[:warmup], Arrival.closed(4), num_requests=warmup,
        extra_body=extra_body, progress=False,
    )  # fmt: skip
    rows = {}
    # Every level gets prompts no earlier request used: a repeated prompt would be served
    # from whatever prefix cache the server keeps (pdserve's blocks, llama-server's slots).
    start = warmup
    for concurrency in levels:
        count = level_requests(concurrency, num_requests)
        result = run_benchmark_sync(
            server.url, model, specs[start : start + count], Arrival.closed(concurrency),
            num_requests=count, extra_body=extra_body, progress=False,
        )  # fmt: skip
        start += count
        s = summarize(result)
        rows[concurrency] = {
            "requests": s.num_requests,
            "errors": s.num_errors,
            "without_usage": s.num_without_usage,
            "output_tok_s": s.output_throughput,
            "ttft_p50_ms": s.ttft_ms.p50 if s.ttft_ms else None,
            "ttft_p99_ms": s.ttft_ms.p99 if s.ttft_ms else None,
            "tpot_p50_ms": s.tpot_ms.p50 if s.tpot_ms else None,
            "tpot_p99_ms": s.tpot_ms.p99 if s.tpot_ms else None,
            "mean_output_tokens": (
                sum(r.num_output_tokens for r in result.records if r.is_ok) / max(1, s.num_ok)
            ),
            # The same text is more tokens to llama.cpp (its converted tokenizer merges
            # differently, see model/builtin.py): more prefill work for the same prompts.
            "mean_prompt_tokens": (
                sum(r.num_prompt_tokens for r in result.records if r.is_ok) / max(1, s.num_ok)
            ),
        }
        print(f"  {concurrency:>3}: {json.dumps(_rounded(rows[concurrency]))}", flush=True)
        errors = sorted({r.error for r in result.records if r.error})
        if errors:
            print(f"       errors: {errors[:3]}", flush=True)
    return rows


def level_requests(concurrency: int, num_requests: int) -> int:
    return num_requests or max(16, 3 * concurrency)


def _rounded(row: dict) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: built-in)")
    default = [n for n in PDSERVE_CONFIGS if n not in PDSERVE_ENV]
    parser.add_argument("--servers", default=",".join([*default, *PEERS]))
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--workload", default="random:in=256,out=128")
    parser.add_argument("--num-requests", type=int, default=0, help="per level (0: 3x c, >=16)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt-format",
        choices=("text", "ids"),
        default="text",
        help="send prompts as text (each server tokenises) or as pdserve's token ids (the "
        "same tokens, so the same prefill work, everywhere; transformers serve gets text)",
    )
    parser.add_argument("--log-dir", default="/tmp/pdserve-serving-peers")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    model_dir = common.resolve_model_dir(args.model)
    levels = [int(c) for c in args.concurrency.split(",")]
    names = [n for n in args.servers.split(",") if n]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    workload = get_workload(args.workload)
    num_specs = args.warmup + sum(level_requests(c, args.num_requests) for c in levels)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    specs = list(workload.sample(num_specs, args.seed, tokenizer))
    id_specs = specs
    if args.prompt_format == "ids":
        if any(s.prompt is None for s in specs):
            raise SystemExit("--prompt-format ids needs a completions workload (text prompts)")
        id_specs = [dataclasses.replace(s, prompt=tokenizer.encode(s.prompt)) for s in specs]
    context = max(s.num_prompt_tokens or 0 for s in specs) + max(s.max_tokens for s in specs)
    common.print_header(
        "Serving throughput at fixed concurrency: pdserve vs llama-server vs transformers serve",
        {
            "hardware": common.hardware_info(),
            "model": common.model_info(model_dir),
            "workload": {
                "name": args.workload,
                "description": workload.description,
                "closed loop, requests per level": args.num_requests or "max(16, 3 x c)",
                "concurrency": levels,
                "fixed output length": "ignore_eos (pdserve, llama-server); min_new_tokens"
                " (transformers serve)",
                "sampling": "greedy (temperature 0) everywhere",
                "prompts": args.prompt_format,
            },
        },
    )
    results: dict[str, dict] = {}
    for name in names:
        started = start_server(name, model_dir, log_dir, context, specs)
        if started is None:
            print(f"{name}: not built, skipped (see benchmarks/peers/README.md)")
            continue
        server, model, extra_body = started
        print(f"{name}: starting ({log_dir / name}.log)", flush=True)
        try:
            if not server.wait_ready(600):
                print(f"{name}: did not become ready; see its log", file=sys.stderr)
                continue
            as_ids = args.prompt_format == "ids" and name != "transformers-serve"
            results[name] = measure(
                server, model, extra_body, id_specs if as_ids else specs, levels,
                args.num_requests, args.warmup,
            )  # fmt: skip
        finally:
            server.stop()
    print_table(results, levels)
    common.write_json(args.json_out, {"levels": levels, "results": results})
    return 0


def print_table(results: dict[str, dict], levels: list[int]) -> None:
    headers = ["server", "c", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "err"]
    rows = []
    for name, by_level in results.items():
        for c in levels:
            r = by_level.get(c)
            if r:
                rows.append(
                    [name, c, r["output_tok_s"], r["ttft_p50_ms"], r["ttft_p99_ms"],
                     r["tpot_p50_ms"], r["tpot_p99_ms"], r["errors"]]
                )  # fmt: skip
    print()
    print(common.format_table(headers, rows))
    ours = [n for n in results if n in PDSERVE_CONFIGS]
    for peer, goal in (("llama-server", LLAMA_GOAL), ("transformers-serve", TRANSFORMERS_GOAL)):
        if peer not in results:
            continue
        for name in ours:
            for c in levels:
                mine, theirs = results[name].get(c), results[peer].get(c)
                if not mine or not theirs or not theirs["output_tok_s"]:
                    continue
                ratio = mine["output_tok_s"] / theirs["output_tok_s"]
                ttft = _ratio(mine["ttft_p99_ms"], theirs["ttft_p99_ms"])
                verdict = (
                    f" (goal >= {goal}x: {common.goal_verdict(ratio, goal)})" if c == 32 else ""
                )
                print(
                    f"{name} / {peer} at c={c}: throughput {ratio:.2f}x, p99 TTFT {ttft}{verdict}"
                )


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


if __name__ == "__main__":
    sys.exit(main())
