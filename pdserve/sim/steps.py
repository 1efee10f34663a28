"""A worker's step in progress, or a run of decode steps, under processor sharing.

`Busy` holds the work a worker has started: one scheduler step, or a run of steps the
scheduler foresaw as the same decode batch (`SimWorker.start_step`), each step's
seconds at full speed. Its speed changes while it runs (other workers start and stop
stepping on the shared cores: sim/cluster.py's `_reschedule`); it keeps the history of
those changes so that, when a run ends, the time each of its steps ended is known
exactly — the clock its tokens carry. A message reaching the worker cuts a run after the
step in progress (`cut`), as a real worker reads its messages between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Busy:
    worker: object  # SimWorker
    work: object  # SchedulerOutput, or DecodeRun
    works: list[float]  # each step's seconds at full speed
    started: float
    tokens: int = 0  # tokens of each step (a decode run: its rows), for `contention_curve`
    speed: float = 0.0  # set by `set_speed` before the first end event
    version: int = 0
    done: float = 0.0  # work done by `since`
    since: float = 0.0
    total: float = 0.0
    history: list[tuple[float, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.since = self.started
        total = 0.0
        for w in self.works:
            total += w
        self.total = total

    @property
    def is_run(self) -> bool:
        return len(self.works) > 1

    def end_time(self) -> float:
        return self.since + (self.total - self.done) / self.speed

    def set_speed(self, now: float, speed: float) -> None:
        """From `now` on the work advances at `speed`; the end event must be renewed."""
        if self.speed:
            self.done = min(self.total, self.done + (now - self.since) * self.speed)
        self.since = now
        self.speed = speed
        self.version += 1
        if self.history or len(self.works) > 1:
            self.history.append((now, self.done, speed))

    def add_work(self, now: float, seconds: float) -> None:
        """More work for a single step (the front end's queue grows): its end moves."""
        if self.speed:
            self.done = min(self.total, self.done + (now - self.since) * self.speed)
        self.since = now
        self.works[0] += seconds
        self.total += seconds
        self.version += 1

    def cut(self, now: float) -> bool:
        """End a run after the step in progress at `now` (one ending now counts as in
        progress). True when that shortened it (its end event must be renewed)."""
        if len(self.works) < 2:
            return False
        done = self.done + (now - self.since) * self.speed
        cum, keep = 0.0, 0
        for w in self.works:
            cum += w
            keep += 1
            if cum >= done:
                break
        if keep == len(self.works):
            return False
        del self.works[keep:]
        self.total = cum
        self.version += 1
        return True

    def step_ends(self, end: float) -> list[float]:
        """When each step ended (the last at `end`, the time of the end event)."""
        ends, cum, k, history = [], 0.0, 0, self.history
        for w in self.works:
            cum += w
            while k + 1 < len(history) and history[k + 1][1] <= cum:
                k += 1
            t, done, speed = history[k]
            ends.append(t + (cum - done) / speed)
        ends[-1] = end
        return ends
