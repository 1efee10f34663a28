"""The watchdog: exited workers are marked dead at once and restarted with exponential
backoff, without a lifetime cap; the backoff resets once a worker stays up."""

from __future__ import annotations

import sys

from pdserve.control.launcher import LocalLauncher, RestartPolicy, Watchdog


def test_backoff_doubles_up_to_the_cap():
    policy = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=4.0)
    assert [policy.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_crash_loop_is_retried_forever_with_backoff(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("pdserve.control.launcher.time.monotonic", clock)
    launcher = LocalLauncher(lambda role, worker_id: [sys.executable, "-c", "raise SystemExit(3)"])
    marked = []
    watchdog = Watchdog(
        launcher, lambda w, how: marked.append((w, how)), RestartPolicy(1.0, 8.0, 60.0)
    )
    launcher.spawn("mixed", "mixed-0")
    delays = []
    for _ in range(6):  # far past the old cap of 3 restarts
        launcher.procs["mixed-0"].wait()
        watchdog.check()
        due = watchdog.restarts["mixed-0"].due
        delays.append(due - clock.now)
        clock.now = due - 0.01
        watchdog.check()
        assert watchdog.restarts["mixed-0"].due == due  # not restarted early
        clock.now = due
        watchdog.check()  # restarted now
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert marked == [("mixed-0", "exited with code 3")] * 6
    assert watchdog.restarts["mixed-0"].num_total == 6
    # Up for longer than stable_after_s: the next failure starts from the first delay.
    launcher.started["mixed-0"] = clock.now - 61.0
    launcher.procs["mixed-0"].wait()
    watchdog.check()
    assert watchdog.restarts["mixed-0"].due - clock.now == 1.0
    launcher.stop()


def test_kill_ends_a_live_worker_and_the_watchdog_sees_it():
    launcher = LocalLauncher(lambda role, w: [sys.executable, "-c", "import time; time.sleep(60)"])
    marked = []
    watchdog = Watchdog(launcher, lambda w, how: marked.append((w, how)))
    launcher.spawn("decode", "decode-0")
    launcher.kill("decode-0")
    launcher.procs["decode-0"].wait(10)
    watchdog.check()
    assert marked == [("decode-0", "exited with code -9")]
    launcher.stop()
