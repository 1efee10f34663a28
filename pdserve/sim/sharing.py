"""How work in progress shares a CPU machine: the speed of each step at a moment.

Three effects, each from a number a profile measures:

- Cores (processor sharing): with `d` threads busy on `c` cores each runs at
  `min(1, c/d)` of its speed alone. Busy threads are the stepping workers', the front
  end's while it has work, `background_load` (other programs on a shared host), and
  `busy_workers` (workers outside the simulation stepping all along: the SLO planner
  rates one worker beside a busy neighbour this way, sim/rates.py).
- Memory bandwidth (`Profile.contention`): a step reads the model's weights once, which
  alone takes `memory_s` (the cost of a one-token step, `tokens(1)`: a step that small is
  bound by that read). While another worker steps (or a `busy_workers` one is counted),
  the read is `contention` times slower; the rest of the step (compute) is not. So a small decode step stretches by nearly
  `contention`, a long prefill barely: a step of `t` seconds runs at
  `t / (t + (contention - 1) * min(t, memory_s))`. (For a run of decode steps, `t` is
  its mean step.)
- Compute (`Profile.compute_contention`): where two "cores" are hardware threads of one
  physical core, or a hypervisor gives two busy vCPUs less than two cores, the rest of a
  step (`t - min(t, memory_s)`) is also slower while another worker steps, by this
  factor (1.0: not slower). `pdserve profile` fits both factors to the slowdowns of a
  prefill and two decode shapes run alone and beside one another.
- Contention by step shape (`Profile.contention_curve`): the same runs say the slowdown
  depends on the step (a 256-token prefill ~1.8x, a one-row decode ~1.2x on the Zen 4
  host), which two factors over read/compute seconds do not follow. When the profile has
  the curve — (tokens in the step, slowdown) knots, each the median slowdown measured for
  that shape beside the same shape — every stepping worker runs at `1 /
  curve_slowdown(N)`, N the tokens of the largest step in progress (a decode run: its
  rows): linear between knots, flat past the ends. It then replaces the two factors.
  The profile times each shape only beside itself, so whether a decode beside a prefill
  slows like the decode or like the prefill is not measured; re-simulating the evening's
  16 real runs, the larger step's slowdown for both (3 cells meet both goals) beat each
  step's own (1 cell) — docs/benchmarks.md.
- The front end (`Profile.frontend_s_per_request`, `frontend_s_per_token`,
  `frontend_s_per_step`): the router process and the load generator spend CPU on every
  request (HTTP, tokenising), every streamed token (detokenising, SSE, parsing) and
  every step message a worker sends the router (receiving and decoding it, waking the
  requests it carries: once per step whatever its batch) on the same cores. It is one
  more busy thread while it has such work queued (`FrontEnd`), served at its share of
  the cores.

On accelerators (a profile whose device is not the CPU) every worker has its own devices
and steps at full speed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from pdserve.sim.steps import Busy


class FrontEnd:
    """The router and the client as one single-threaded consumer of CPU."""

    worker_id = "frontend"
    role = "frontend"
    threads = 1
    memory_s = 0.0  # not a contender for the weights' bandwidth


def curve_slowdown(curve: tuple[tuple[int, float], ...], num_tokens: int) -> float:
    """The slowdown of an N-token step beside another worker (module docstring)."""
    if num_tokens <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if num_tokens <= x1:
            return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)
    return curve[-1][1]


def speeds(
    steps: Mapping[str, Busy],
    cores: int,
    background_load: float,
    contention: float,
    *,
    compute_contention: float = 1.0,
    busy_workers: int = 0,
    curve: tuple[tuple[int, float], ...] = (),
) -> dict[str, float]:
    """The speed of each work in progress (module docstring)."""
    demand = background_load + busy_workers + sum(b.worker.threads for b in steps.values())
    share = min(1.0, cores / demand) if demand > 0 else 1.0
    num_reading = busy_workers + sum(1 for b in steps.values() if b.worker.memory_s > 0)
    largest = max((b.tokens for b in steps.values() if b.worker.memory_s > 0), default=0)
    out = {}
    for key, busy in steps.items():
        speed = share
        memory_s = busy.worker.memory_s
        if curve and memory_s > 0 and num_reading > 1:
            speed /= curve_slowdown(curve, max(busy.tokens, largest))
        elif memory_s > 0 and num_reading > 1 and (contention != 1.0 or compute_contention != 1.0):
            t = busy.total / len(busy.works)
            m = min(t, memory_s)
            speed *= t / (t + (contention - 1.0) * m + (compute_contention - 1.0) * (t - m))
        out[key] = speed
    return out
