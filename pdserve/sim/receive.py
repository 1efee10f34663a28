"""The decode worker's CPU per received hand-over, measured on this machine.

A decode worker that takes a prompt's KV from a prefill worker spends CPU of its own on
it, beside its decode steps: it decodes `ReserveKV` (the prompt's ids), hashes the prompt
and reserves its blocks (`Scheduler.can_reserve` / `reserve`), answers `KVReserved`,
decodes `KVDone` and starts the request from its first token (`Scheduler.finish_import`:
the blocks' hashes registered with the prefix cache). With the shm backend the KV itself
is written by the prefill worker (`TransferCost.on_sender`), so this bookkeeping is all
the receiving side does; `pdserve profile`'s transfer timing does not contain it.

`measure_receive` times exactly that path, the real messages and scheduler, for prompts
of a few sizes, and fits `seconds = per_request + per_block * blocks` (least squares).
The simulator charges it to the decode worker's next step (sim/worker.py `on_kv_done`).
Torch-free; about a second (`quick`: a tenth).
"""

from __future__ import annotations

import time

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.ipc import messages as m
from pdserve.sampling_params import SamplingParams

BLOCK_SIZE = 16


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y) points, each clipped
    at 0 (noise); one distinct x: all of it is intercept."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return max(0.0, my), 0.0
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in points) / sxx)
    return max(0.0, my - slope * mx), slope


def _one(scheduler: Scheduler, index: int, num_blocks: int, params: SamplingParams) -> float:
    """Seconds of the decode side of one hand-over of a `num_blocks`-block prompt."""
    tokens = [(index * 7919 + i) % 30000 + 1000 for i in range(num_blocks * BLOCK_SIZE)]
    reserve = m.encode(m.ReserveKV(f"r{index}", f"t{index}", tokens, params, 60.0))
    done = m.encode(m.KVDone(f"t{index}", f"r{index}", 0, first_token_id=5))
    start = time.perf_counter()
    message = m.decode(reserve)
    request = Request(
        message.request_id,
        message.prompt_token_ids,
        message.params,
        max_tokens=message.params.max_tokens,
    )
    if not scheduler.can_reserve(request):
        raise RuntimeError("receive timing: the pool is too small")
    scheduler.reserve(request)
    m.encode(m.KVReserved("decode-0", request.request_id, message.transfer_id, request.block_ids))
    kv_done = m.decode(done)
    scheduler.finish_import(request, kv_done.first_token_id, is_intact=True)
    seconds = time.perf_counter() - start
    scheduler.abort_requests([request])
    return seconds


def measure_receive(quick: bool = False) -> tuple[float, float, dict]:
    """(seconds per request, seconds per block, the samples): the fastest of several
    timings of each prompt size (1 to 128 blocks)."""
    sizes, repeats = ((1, 32), 5) if quick else ((1, 8, 32, 128), 25)
    manager = BlockManager(4 * max(sizes), BLOCK_SIZE, True, record_events=True)
    scheduler = Scheduler(SchedulerConfig(8, 4096, True), manager)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    points, index = [], 0
    for num_blocks in sizes:
        best = float("inf")
        for _ in range(repeats):
            index += 1  # fresh tokens: no prefix-cache hit
            best = min(best, _one(scheduler, index, num_blocks, params))
            manager.drain_evicted()
        points.append((float(num_blocks), best))
    per_request, per_block = fit_line(points)
    return per_request, per_block, {"blocks_seconds": points}
