"""The router's start-up objects leave the collector's walks (`router/heap.py`)."""

import gc

from pdserve.router.heap import GEN0_THRESHOLD, freeze_startup_objects


def test_objects_alive_at_the_freeze_are_never_walked_again_and_newer_ones_are():
    alive = [["start-up state"]]  # lists are tracked by the collector
    thresholds = gc.get_threshold()
    try:
        frozen = freeze_startup_objects()
        newer = [["request state"]]
        walked = {id(o) for o in gc.get_objects()}
        assert id(alive) not in walked and id(alive[0]) not in walked
        assert id(newer) in walked and id(newer[0]) in walked
        assert frozen == gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GEN0_THRESHOLD, *thresholds[1:])
    finally:  # the rest of the test session collects as usual
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert id(alive) in {id(o) for o in gc.get_objects()}
