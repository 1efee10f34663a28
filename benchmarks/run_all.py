"""Run every benchmark with its defaults, one after the other (what `make bench` calls).

Each benchmark runs as its own process, so one's memory and threads never colour the
next one's numbers, and a failure in one still lets the others report. Extra arguments
are not forwarded: run a script directly to change its workload.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import common

BENCHMARKS = (
    "offline_throughput",
    "decode_roofline",
    "kv_transfer",
    "ttft_disagg",
    "int8_kv",
    "attention_kernel",
    "cpu_gemm",
    "sampler",
    "prefill_last_layer",
    "batch_invariant",
    "serving_peers",  # peers skipped with a note when not built (benchmarks/peers/)
    "kv_cache",
    "tier_admission",  # admit-all vs frequency admission into a small disk tier
    "overload_admission",
    "chaos",  # random worker kills under load: nothing lost (fault tolerance)
    "ray_overhead",  # launcher: ray vs local processes, same layout
)


def run(name: str, json_dir: Path | None) -> int:
    """Run one benchmark script; its exit code."""
    cmd = [sys.executable, str(Path(__file__).with_name(f"{name}.py"))]
    if json_dir:
        cmd += ["--json-out", str(json_dir / f"{name}.json")]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(cmd).returncode
    print(f"[{name}] exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; non-zero if any failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json-dir", type=Path, default=None, help="write <name>.json files here")
    p.add_argument("--only", default=",".join(BENCHMARKS), type=lambda s: s.split(","))
    args = p.parse_args(argv)
    load = common.machine_load()
    if load >= 1.0:
        print(f"WARNING: 1-minute load average is {load:.2f}; numbers will be noisy", flush=True)
    codes = {name: run(name, args.json_dir) for name in args.only}
    print(
        "\nsummary:", ", ".join(f"{n}: {'ok' if c == 0 else f'exit {c}'}" for n, c in codes.items())
    )
    return max(codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
