"""`LivenessFile`: the file's mtime is the wall-clock time of the loop's last pass."""

from __future__ import annotations

import time

from pdserve.worker.liveness import LivenessFile


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
