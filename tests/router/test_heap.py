"""The router's start-up objects leave the collector's walks (`router/heap.py`)."""

import gc

from pdserve.router.heap import freeze_startup_objects


def test_objects_alive_at_the_freeze_are_never_walked_again_and_newer_ones_are():
    alive = [["start-up state"]]  # lists are tracked by the collector
    try:
        frozen = freeze_startup_objects()
        newer = [["request state"]]
        walked = {id(o) for o in gc.get_objects()}
        assert id(alive) not in walked and id(alive[0]) not in walked
        assert id(newer) in walked and id(newer[0]) in walked
        assert frozen == gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert id(alive) in {id(o) for o in gc.get_objects()}
