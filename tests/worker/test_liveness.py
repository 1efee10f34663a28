"""`LivenessFile`: the file's mtime is the wall-clock time of the loop's last pass.
`LoopClock`: how long the loop has been in its pass, and how long a pass may take."""

from __future__ import annotations

import time

from pdserve.worker import liveness
from pdserve.worker.liveness import LivenessFile, LoopClock


def test_the_stamp_is_the_time_of_the_last_pass_not_of_the_stamping(tmp_path):
    path = tmp_path / "alive"
    health = LivenessFile(path)
    health.stamp(time.monotonic())
    assert abs(path.stat().st_mtime - time.time()) < 5
    health.stamp(time.monotonic() - 300)  # the loop has been stuck for 5 minutes
    assert abs(path.stat().st_mtime - (time.time() - 300)) < 5


def test_a_failed_stamp_never_raises_and_remove_is_idempotent(tmp_path):
    health = LivenessFile(tmp_path / "missing-folder" / "alive")
    health.stamp(time.monotonic())
    health.stamp(time.monotonic())
    assert not health.path.exists()
    health.remove()
    LivenessFile(tmp_path / "alive").remove()


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_loop_clock_keeps_the_longest_pass_decayed_never_below_the_prediction(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(liveness.time, "monotonic", clock_time.monotonic)
    clock = LoopClock(predicted_step_s=0.5)
    assert (clock.stalled_s(), clock.pass_max_s()) == (0.0, 0.5)
    clock_time.now += 8.0  # a long pass
    assert clock.stalled_s() == 8.0
    clock.completed_pass()
    assert (clock.stalled_s(), clock.pass_max_s()) == (0.0, 8.0)
    clock_time.now += 0.01
    clock.completed_pass()  # a short one does not replace it
    clock_time.now += liveness.PASS_MAX_HALF_LIFE_S - 0.01
    assert clock.pass_max_s() == 4.0  # halved a half-life after it was seen
    clock_time.now += 10 * liveness.PASS_MAX_HALF_LIFE_S
    assert clock.pass_max_s() == 0.5  # the prediction is the floor
    clock_time.now += 3.0
    clock.restart()  # e.g. the loop (re)starts: time before it is no stall
    assert clock.stalled_s() == 0.0
