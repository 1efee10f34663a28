"""The cost model: seconds of one engine step, from what the step computes.

One implementation, used by everything that predicts time: the simulator (`sim/cluster.py`),
the planner (`sim/plan.py`) and the elastic planner's "propose" step. A profile
(`sim/profile.py`) holds one `StepCost` per worker size (CPU threads, or GPUs per worker
for analytic profiles), measured by `pdserve profile` or derived from a hardware
description (`sim/analytic.py`).

The model, for a step computing N tokens of which S rows are sampled:

    seconds = tokens(N)                       piecewise-linear in N over measured knots
            + row_s * (S - 1)                 each sampled row past the first: lm_head + sampler
            + prefill_attention_s * Σ q·(c+q) over prefill spans (q new tokens after c)
            + decode_attention_s  * Σ (c+1)   over decode rows (the context each one reads)
            + prefill_step_s      if the step has a prefill span
            + step_overhead_s

`prefill_step_s`: a step of decode rows only runs the whole decoder stack in one fused
call on a CPU (model/kernels/decode_step.c); a step with any prefill span runs layer by
layer in PyTorch, which costs a few ms more per step whatever its size (measured on the
Zen 4 host: a one-row decode plus a two-token prompt tail 14-19 ms, a three-row decode
8-10 ms). `step_overhead_s`: the worker's loop pass around each step (scheduling,
sending outputs, reading messages), from a real run's step log (sim/step_log_fit.py).

`tokens(N)` carries the weight-bound and compute-bound regimes of the linear layers (flat
while a step is bound by reading the weights, then rising with N); the attention terms
carry the context. Past its last knot `tokens(N)` continues along its last segment. Every
term is a number a reader can check against a measurement, which is why it is not a
black-box regression. `fit_step_cost` fits it to timed samples by least squares on
relative error (a 10 ms decode step counts as much as a 1 s prefill).

Torch-free; numpy only for the fit.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pdserve.engine.step_log import step_shape


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one step computes, as the cost model sees it."""

    num_tokens: int
    num_sampled: int
    prefill_attention: int  # Σ q·(c+q) over prefill spans
    decode_context: int  # Σ (c+1) over decode rows


def shape_of(scheduled: Iterable[Any]) -> StepShape:
    """The shape of a scheduler step (`ScheduledRequest`s: `num_new_tokens`, `start`,
    `is_sampling`). A one-token span is a decode row, as the model runner treats it."""
    return StepShape(*_sums(scheduled))


def _sums(scheduled: Iterable[Any]) -> tuple[int, int, int, int]:
    shape = step_shape(scheduled)  # the engine's own count (its step log uses it too)
    return shape["tokens"], shape["sampled"], shape["prefill_attention"], shape["decode_context"]


@dataclass(frozen=True)
class StepCost:
    """Seconds of one step for one worker size; see the module docstring."""

    token_knots: tuple[int, ...]
    token_seconds: tuple[float, ...]
    row_s: float
    prefill_attention_s: float
    decode_attention_s: float
    step_overhead_s: float = 0.0
    prefill_step_s: float = 0.0

    def __post_init__(self) -> None:
        if len(self.token_knots) != len(self.token_seconds) or not self.token_knots:
            raise ValueError("token_knots and token_seconds must be non-empty and equally long")
        if list(self.token_knots) != sorted(set(self.token_knots)):
            raise ValueError("token_knots must be strictly increasing")

    def tokens_seconds(self, num_tokens: int) -> float:
        knots, values = self.token_knots, self.token_seconds
        if num_tokens <= knots[0]:
            return values[0]
        if len(knots) == 1:
            return values[0] * num_tokens / knots[0]
        i = bisect.bisect_left(knots, num_tokens)
        i = min(i, len(knots) - 1)  # past the end: continue the last segment
        x0, x1, y0, y1 = knots[i - 1], knots[i], values[i - 1], values[i]
        return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)

    def seconds(self, shape: StepShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        return (
            self.tokens_seconds(shape.num_tokens)
            + self.row_s * max(0, shape.num_sampled - 1)
            + self.prefill_attention_s * shape.prefill_attention
            + self.decode_attention_s * shape.decode_context
            + (self.prefill_step_s if shape.prefill_attention else 0.0)
            + self.step_overhead_s
        )

    def step_seconds(self, scheduled: Iterable[Any]) -> float:
        """Seconds of a scheduler step (its `ScheduledRequest`s)."""
        return self.seconds(shape_of(scheduled))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["token_knots"] = list(self.token_knots)
        data["token_seconds"] = list(self.token_seconds)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepCost:
        return cls(
            token_knots=tuple(int(k) for k in data["token_knots"]),
            token_seconds=tuple(float(v) for v in data["token_seconds"]),
            row_s=float(data["row_s"]),
            prefill_attention_s=float(data["prefill_attention_s"]),
            decode_attention_s=float(data["decode_attention_s"]),
            step_overhead_s=float(data.get("step_overhead_s", 0.0)),
            prefill_step_s=float(data.get("prefill_step_s", 0.0)),
        )

    def scaled(self, factor: float) -> StepCost:
        """Every term times `factor` (e.g. a slowdown from cores shared with others)."""
        return StepCost(
            self.token_knots,
            tuple(v * factor for v in self.token_seconds),
            self.row_s * factor,
            self.prefill_attention_s * factor,
            self.decode_attention_s * factor,
            self.step_overhead_s * factor,
            self.prefill_step_s * factor,
        )


class StepTimer:
    """`StepCost.step_seconds` for the simulator's hot path: the same sums in the same
    order (so the same floats), with `tokens(N)` read from a table for every N up to
    `max_tokens` (a step never computes more than the scheduler's token budget) instead
    of a search per step."""

    def __init__(self, cost: StepCost, max_tokens: int) -> None:
        self.cost = cost
        self.table = [cost.tokens_seconds(n) for n in range(max_tokens + 1)]

    def __call__(self, scheduled: Iterable[Any]) -> float:
        num_tokens, num_sampled, prefill, decode = _sums(scheduled)
        if num_tokens == 0:
            return 0.0
        cost, table = self.cost, self.table
        tokens = table[num_tokens] if num_tokens < len(table) else cost.tokens_seconds(num_tokens)
        return (
            tokens
            + cost.row_s * max(0, num_sampled - 1)
            + cost.prefill_attention_s * prefill
            + cost.decode_attention_s * decode
            + (cost.prefill_step_s if prefill else 0.0)
            + cost.step_overhead_s
        )

    def decode_steps(self, num_rows: int, decode_context: int, num_steps: int) -> list[float]:
        """Seconds of `num_steps` decode steps of the same `num_rows` rows, the first
        reading `decode_context` (Σ (c+1)), each later one `num_rows` more: the floats
        `__call__` gives for each of those steps."""
        cost = self.cost
        tokens = (
            self.table[num_rows] if num_rows < len(self.table) else cost.tokens_seconds(num_rows)
        )
        fixed = tokens + cost.row_s * max(0, num_rows - 1) + cost.prefill_attention_s * 0
        return [
            fixed + cost.decode_attention_s * (decode_context + num_rows * i) + cost.step_overhead_s
            for i in range(num_steps)
        ]


# ---- fitting -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimedStep:
    shape: StepShape
    seconds: float


def fit_step_cost(
    samples: Sequence[TimedStep],
    step_overhead_s: float = 0.0,
    knots: Sequence[int] | None = None,
) -> StepCost:
    """Least squares on relative error over the model's parameters: the value of
    `tokens(N)` at every N measured without prefill context (decode-only steps, fresh
    prefills: hat functions; a step at another N reads `tokens(N)` between its
    neighbouring knots, as `tokens_seconds` does), `row_s`, the two attention
    coefficients and, when the samples have both decode-only steps and steps with a
    prefill span, `prefill_step_s`. So a prefill after context pins the
    prefill-attention term whether or not a fresh prefill of the same N was measured.
    `knots`: fixed N knots instead (samples of a real run have too many distinct N).
    Negative coefficients (noise) are clipped to 0 and the rest refitted."""
    import numpy as np

    if knots is None:
        knots = sorted({s.shape.num_tokens for s in samples if _is_knot(s.shape)})
        if not knots:
            knots = sorted({s.shape.num_tokens for s in samples})
    knots = list(knots)
    has_prefill = [s.shape.prefill_attention > 0 for s in samples]
    with_step = any(has_prefill) and not all(has_prefill)
    k = len(knots)
    num_params = k + 4
    rows, targets = [], []
    for sample, prefill in zip(samples, has_prefill, strict=True):
        row = [0.0] * num_params
        for i, w in _hat_weights(knots, sample.shape.num_tokens):
            row[i] += w
        row[k] = max(0, sample.shape.num_sampled - 1)
        row[k + 1] = sample.shape.prefill_attention
        row[k + 2] = sample.shape.decode_context
        row[k + 3] = 1.0 if prefill else 0.0
        weight = 1.0 / sample.seconds
        rows.append([v * weight for v in row])
        targets.append((sample.seconds - step_overhead_s) * weight)
    a, b = np.asarray(rows), np.asarray(targets)
    free = list(range(num_params if with_step else num_params - 1))
    for _ in range(num_params):
        solution = np.zeros(num_params)
        solution[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
        negative = [i for i in free if solution[i] < 0 and i >= k]
        if not negative:
            break
        free = [i for i in free if i not in negative]
    values = [max(0.0, float(v)) for v in solution]
    return StepCost(
        token_knots=tuple(knots),
        token_seconds=tuple(values[:k]),
        row_s=values[k],
        prefill_attention_s=values[k + 1],
        decode_attention_s=values[k + 2],
        step_overhead_s=step_overhead_s,
        prefill_step_s=values[k + 3],
    )


def _is_knot(shape: StepShape) -> bool:
    """A step whose `tokens(N)` is not mixed up with prefill context: decode rows only,
    or one fresh prefill."""
    n = shape.num_tokens
    return shape.prefill_attention == 0 or (
        shape.prefill_attention == n * n and shape.decode_context == 0
    )


def _hat_weights(knots: Sequence[int], n: int) -> list[tuple[int, float]]:
    """`tokens(n)` as a weighted sum of the knots' values (`StepCost.tokens_seconds`)."""
    if n <= knots[0] or len(knots) == 1:
        return [(0, 1.0 if n <= knots[0] else n / knots[0])]
    i = min(bisect.bisect_left(knots, n), len(knots) - 1)
    if knots[i] == n:
        return [(i, 1.0)]
    t = (n - knots[i - 1]) / (knots[i] - knots[i - 1])
    return [(i - 1, 1.0 - t), (i, t)]


def relative_errors(cost: StepCost, samples: Sequence[TimedStep]) -> list[float]:
    """(predicted - measured) / measured per sample."""
    return [(cost.seconds(s.shape) - s.seconds) / s.seconds for s in samples]
