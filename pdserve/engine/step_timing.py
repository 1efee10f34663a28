"""Timing the model runner on synthetic batches: the measurements behind `pdserve profile`.

`pdserve profile` (pdserve/sim/profile.py) fits a cost model to step times; the simulator
(`pdserve sim`) then advances time by that model instead of running the model. This
module is the only part of that which touches torch, so it lives in `engine/` and runs in
a child process per thread count (`python -m pdserve.engine.step_timing --threads N`),
with `OMP_NUM_THREADS` set as `pdserve serve` sets it for a worker.

What one sample is: `ModelRunner.execute` on a hand-built `SchedulerOutput` — the same
call a worker's step makes — with every request holding its own KV blocks (contents do not
matter for timing; distinct blocks make attention read memory as a real batch would).
Shapes measured:
- `prefill`: one span of `q` new tokens after `c` tokens of context (c = 0: a fresh
  prompt; c > 0: a later chunk or a prompt behind a prefix-cache hit), one sampled row;
- `decode`: `b` rows of one new token each, every row after `c` tokens of context;
- `mixed`: decode rows and a prefill span in one step (kept to check the fit, not fitted).
Each sample is the fastest of `repeats` timed runs after one untimed run: on a shared
machine other processes only ever add time, so the minimum estimates the machine to
itself (what the cost model should describe; sharing is modelled separately).
Also timed: the sampler alone on `[rows, vocab]` logits, and copies of KV-sized buffers
(the shm backend's one copy into the decode worker's pool).

Output: one JSON object on stdout (see `measure`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GRIDS = {
    # (prefill (q, c) pairs, decode (b, c) pairs, mixed (b, c, q), sampler rows)
    "quick": (
        [(16, 0), (64, 0), (256, 0), (1024, 0), (256, 1024)],
        [(1, 64), (4, 64), (16, 64), (64, 64), (16, 1024)],
        [(8, 256, 256)],
        [1, 16, 64],
    ),
    "full": (
        [(q, 0) for q in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)]
        + [(64, 1024), (256, 512), (512, 1536), (128, 3072)],
        [(b, 64) for b in (1, 2, 4, 8, 16, 32, 64)] + [(b, 1024) for b in (1, 4, 16, 64)],
        [(8, 256, 256), (32, 512, 128), (4, 1024, 512)],
        [1, 4, 16, 64],
    ),
    # Run by two processes at once and alone: the slowdown of sharing the machine. A
    # one-row decode is all weight reads (the contention model's `memory_s`).
    "contention": ([(256, 0)], [(1, 64), (16, 256)], [], []),
}


@dataclass(frozen=True)
class Shape:
    kind: str  # prefill | decode | mixed
    num_decodes: int
    decode_context: int  # tokens before each decode row's new token
    prefill_tokens: int
    prefill_context: int  # tokens before the prefill span


def measure(model_dir: Path, threads: int, grid: str, repeats: int, dtype: str) -> dict:
    """Every sample of `grid` on the model in `model_dir` with `threads` threads."""
    import torch

    from pdserve.config import EngineConfig, ModelConfig
    from pdserve.engine.model_runner import ModelRunner

    prefills, decodes, mixed, sampler_rows = GRIDS[grid]
    shapes = (
        [Shape("prefill", 0, 0, q, c) for q, c in prefills]
        + [Shape("decode", b, c, 0, 0) for b, c in decodes]
        + [Shape("mixed", b, c, q, 0) for b, c, q in mixed]
    )
    block_size = 16
    num_blocks = max(_blocks_needed(s, block_size) for s in shapes)
    model_config = ModelConfig.from_pretrained(model_dir)
    config = EngineConfig(
        dtype=dtype, num_kv_blocks=num_blocks, block_size=block_size, num_threads=threads
    )
    runner = ModelRunner(model_dir, model_config, config, model_config.max_position_embeddings)
    samples = [_sample(runner, s, repeats, block_size) for s in shapes]
    return {
        "model_dir": str(model_dir),
        "threads": threads,
        "dtype": dtype,
        "repeats": repeats,
        "torch": torch.__version__,
        "samples": samples,
        "sampler": [_time_sampler(runner, rows, repeats) for rows in sampler_rows],
        "copy": _time_copies(repeats),
    }


def _blocks_needed(shape: Shape, block_size: int) -> int:
    per_decode = -(-(shape.decode_context + 1) // block_size)
    prefill = -(-(shape.prefill_context + shape.prefill_tokens) // block_size)
    return shape.num_decodes * per_decode + prefill + 1


def _sample(runner, shape: Shape, repeats: int, block_size: int) -> dict:
    scheduled = _batch(shape, block_size, runner.model_config.vocab_size)
    runner.execute(scheduled)  # untimed: first-touch and thread start-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(scheduled)
        times.append(time.perf_counter() - start)
    return {
        "kind": shape.kind,
        "num_decodes": shape.num_decodes,
        "decode_context": shape.decode_context,
        "prefill_tokens": shape.prefill_tokens,
        "prefill_context": shape.prefill_context,
        "seconds": min(times),
    }


def _batch(shape: Shape, block_size: int, vocab_size: int):
    from pdserve.engine.request import Request
    from pdserve.engine.scheduler import ScheduledRequest, SchedulerOutput
    from pdserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=1)  # the API's default sampling
    next_block = 0
    scheduled = []

    def request(index: int, num_tokens: int) -> Request:
        nonlocal next_block
        num = -(-num_tokens // block_size)
        ids = [(7919 * (index + 1) * (i + 1)) % vocab_size for i in range(num_tokens)]
        block_ids = list(range(next_block, next_block + num))
        next_block += num
        return Request(f"r{index}", ids, params, max_tokens=1, block_ids=block_ids)

    for i in range(shape.num_decodes):
        r = request(i, shape.decode_context + 1)
        scheduled.append(ScheduledRequest(r, 1, shape.decode_context))
    if shape.prefill_tokens:
        r = request(shape.num_decodes, shape.prefill_context + shape.prefill_tokens)
        scheduled.append(ScheduledRequest(r, shape.prefill_tokens, shape.prefill_context))
    return SchedulerOutput(scheduled)


def _time_sampler(runner, rows: int, repeats: int) -> dict:
    import torch

    from pdserve.engine.sampler import SamplingRow
    from pdserve.sampling_params import SamplingParams

    logits = torch.randn(
        rows, runner.model_config.vocab_size, generator=torch.Generator().manual_seed(0)
    )
    sampling_rows = [SamplingRow(SamplingParams(temperature=1.0), 0, ()) for _ in range(rows)]
    runner.sampler(logits, sampling_rows)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.sampler(logits, sampling_rows)
        times.append(time.perf_counter() - start)
    return {"rows": rows, "seconds": min(times)}


def _time_copies(repeats: int) -> list[dict]:
    """Copy time vs bytes into a warm destination (what the shm backend does per hand-off)."""
    import torch

    results = []
    for num_bytes in (1 << 20, 16 << 20, 64 << 20):
        src = torch.ones(num_bytes // 4)
        dst = torch.zeros(num_bytes // 4)
        dst.copy_(src)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        results.append({"bytes": num_bytes, "seconds": min(times)})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--grid", choices=sorted(GRIDS), default="full")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    if args.model is None:
        from pdserve.model.builtin import ensure_builtin_model

        model_dir = ensure_builtin_model(progress=False)
    else:
        model_dir = Path(args.model)
    result = measure(model_dir, args.threads, args.grid, args.repeats, args.dtype)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
