"""A worker's liveness file: its mtime is when the engine loop last completed a pass.

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
