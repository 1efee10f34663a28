"""An opt-in record of every engine step a serving worker takes: what it computed and how
long each part took.

Set `PDSERVE_STEP_LOG=DIR` in `pdserve serve`'s environment (workers inherit it) and each
worker's `EngineCore` appends one JSON line per step to `DIR/steps-<pid>.jsonl`:

    {"t": wall-clock start (time.time()), "schedule": s, "execute": s, "update": s,
     "tokens": N, "sampled": S, "prefill_attention": Σ q·(c+q), "decode_context": Σ (c+1),
     "prefills": number of prefill spans, "decodes": number of decode rows,
     "threads": the worker's threads}

The shape fields are the cost model's (`sim/cost_model.py`'s `StepShape`), so a real run's
steps can be priced by a profile step by step (`benchmarks/step_log_compare.py`): which
steps the simulator prices wrong, and how much of a worker's time is not steps at all
(the gaps between one step's end and the next one's start). Off by default: the cost when
on is one `perf_counter` per phase and a buffered write (lines are flushed every
`FLUSH_EVERY` steps or `FLUSH_AFTER_S` seconds, and at close: a worker stopped by a
signal loses at most that).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENV = "PDSERVE_STEP_LOG"
FLUSH_EVERY = 64
FLUSH_AFTER_S = 1.0


def step_shape(scheduled: Iterable[Any]) -> dict[str, int]:
    """The cost model's view of a step's `ScheduledRequest`s (`num_new_tokens`, `start`,
    `is_sampling`) — taken before the step's outputs update the requests. A one-token span
    is a decode row, as the model runner treats it. `sim/cost_model.py` prices steps by
    this same count, so a logged step and a simulated one are measured alike."""
    tokens = sampled = prefill = decode = prefills = decodes = 0
    for item in scheduled:
        q = item.num_new_tokens
        tokens += q
        sampled += item.is_sampling
        if q == 1:
            decode += item.start + 1
            decodes += 1
        else:
            prefill += q * (item.start + q)
            prefills += 1
    return {
        "tokens": tokens,
        "sampled": sampled,
        "prefill_attention": prefill,
        "decode_context": decode,
        "prefills": prefills,
        "decodes": decodes,
    }


class StepLog:
    """Buffered JSON lines of step records (module docstring)."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self.threads = threads
        self._lines: list[str] = []
        self._flushed_at = time.monotonic()

    @classmethod
    def from_env(cls, threads: int) -> StepLog | None:
        folder = os.environ.get(ENV)
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"steps-{os.getpid()}.jsonl", threads)

    def record(
        self, start_wall: float, phases: tuple[float, float, float], shape: dict[str, int]
    ) -> None:
        """One step: its wall-clock start, (schedule, execute, update) seconds, its shape."""
        record = {
            "t": round(start_wall, 6),
            "schedule": round(phases[0], 7),
            "execute": round(phases[1], 7),
            "update": round(phases[2], 7),
            **shape,
            "threads": self.threads,
        }
        self._lines.append(json.dumps(record, separators=(",", ":")))
        if len(self._lines) >= FLUSH_EVERY or time.monotonic() - self._flushed_at > FLUSH_AFTER_S:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        with self.path.open("a") as f:
            f.write("\n".join(self._lines) + "\n")
        self._lines = []
        self._flushed_at = time.monotonic()


def read_step_log(folder: Path) -> dict[str, list[dict]]:
    """Every worker's records in `folder`, by file stem (`steps-<pid>`), in step order."""
    logs = {}
    for path in sorted(Path(folder).glob("steps-*.jsonl")):
        logs[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return logs
