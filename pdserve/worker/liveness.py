"""A worker's liveness: how long its engine loop has been in the current pass, how long a
legitimate pass can take (`LoopClock`), and a file whose mtime is when the loop last
completed a pass (`LivenessFile`).

`LoopClock`: the router fences a worker whose loop has not completed a pass for
`lease_s + STALL_MARGIN x loop_pass_max_s` (control/membership.py), so a step that is long
by nature — a real model's 2048-token prefill chunk on a CPU, every step on an overloaded
host — is not taken for a hang, while a hang is still found. `loop_pass_max_s` is the
longest pass seen lately (halved every `PASS_MAX_HALF_LIFE_S` since it was seen), never
below what the worker predicts for its longest step from its warm-up: the warm-up prefill's
seconds per token times the step's token budget.

The file:

Why a file: a worker serves no HTTP and binds its ZeroMQ sockets on random ports, so a
supervisor outside pdserve (Kubernetes' probes, systemd, a shell script) has nothing to ask.
The router judges workers by their heartbeats (`loop_stalled_s`, control/membership.py) and
fences a hung one, but it cannot restart a process it did not start; the supervisor can, if
it can see the hang. `pdserve worker --health-file PATH` gives it that: the heartbeat
thread stamps the file once a second with the wall-clock time of the loop's last completed
pass, so

- the file appears only once the model is loaded and the loop runs (a startup signal);
- it ages while the loop is stuck in a step, deadlocked or gone, although the process
  lives (the heartbeat keeps running, but stamps the old pass time);
- it ages too when the heartbeat thread itself dies.

A probe compares the file's age with a bound (deploy/kubernetes: 60 s, well above the
router's lease, so the router migrates requests first and a restart is the last resort).
Stamping is best effort: a failed write is logged once and never stops the worker.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PASS_MAX_HALF_LIFE_S = 60.0


class LoopClock:
    """The engine loop's pass times, written by the loop and read by the heartbeat thread
    (plain float attributes: a torn read cannot happen in CPython)."""

    def __init__(self, predicted_step_s: float = 0.0) -> None:
        self.last_pass = time.monotonic()  # loading and warm-up are not a stalled loop
        self.predicted_step_s = predicted_step_s  # the floor of `pass_max_s`
        self._max_s = predicted_step_s
        self._max_at = self.last_pass

    def restart(self) -> None:
        """The loop starts (again) now: nothing before this counts as a stall."""
        self.last_pass = time.monotonic()

    def completed_pass(self) -> None:
        now = time.monotonic()
        seconds = now - self.last_pass
        if seconds >= self.pass_max_s(now):
            self._max_s, self._max_at = seconds, now
        self.last_pass = now

    def stalled_s(self) -> float:
        """Seconds since the loop last completed a pass."""
        return time.monotonic() - self.last_pass

    def pass_max_s(self, now: float | None = None) -> float:
        age = (time.monotonic() if now is None else now) - self._max_at
        decayed = self._max_s * 0.5 ** (age / PASS_MAX_HALF_LIFE_S)
        return max(decayed, self.predicted_step_s)


class LivenessFile:
    """Stamps `path` with the wall-clock time of the loop's last completed pass."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._has_failed = False

    def stamp(self, last_pass_monotonic: float) -> None:
        """Set the file's mtime to when the loop last completed a pass (`time.monotonic()`
        then), creating the file on the first call."""
        last_pass_wall = time.time() - (time.monotonic() - last_pass_monotonic)
        try:
            self.path.touch(exist_ok=True)
            os.utime(self.path, (last_pass_wall, last_pass_wall))
        except OSError as e:
            if not self._has_failed:
                logger.error("cannot stamp the liveness file %s: %s", self.path, e)
            self._has_failed = True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
