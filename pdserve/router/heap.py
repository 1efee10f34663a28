"""The router process's garbage collector: start-up objects frozen out of its collections,
and young collections spaced further apart.

Why: the router's event loop answers every HTTP request, and CPython's cyclic collector
stops it for as long as a collection takes. A full (generation 2) collection walks every
tracked object, and after start-up that is ~200k of them (FastAPI and pydantic models,
the tokenizer, prometheus, ZeroMQ), ~50-150 ms on this project's hosts. Collections are
triggered by the net growth of tracked objects (700 more than freed: a young collection;
every 10th of those looks at the middle generation, every 10th of those at all), and a
burst of connections grows them fast: each open connection holds tens (protocol,
transport, parser, flow control, headers), so 2000-4000 requests at once ran 1-2 full
collections, and the router spent 0.16-0.38 s of such a burst in the collector while
the refusals waited (docs/benchmarks.md, Overload, "Where a burst's refusal time goes").

`freeze_startup_objects` collects once and then moves everything alive into the
permanent generation (`gc.freeze`), which the collector never walks: later collections
cost what was created since start-up, not the whole process. It also raises the young
generation's threshold from 700 to `GEN0_THRESHOLD` objects, so a burst's connections
trigger ~30x fewer collections (a young collection then walks up to that many objects:
~1-2 ms). Frozen objects are still freed by reference counting; only cycles among them
(start-up state, alive for the life of the process anyway) are never reclaimed, and
cyclic garbage made later waits a little longer for its collection.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 20_000  # net new tracked objects between young collections (CPython: 700)


def freeze_startup_objects(gen0_threshold: int = GEN0_THRESHOLD) -> int:
    """Collect, exempt every object alive now from future collections, and space young
    collections `gen0_threshold` objects apart. Returns the number of objects frozen in
    all (`gc.get_freeze_count`). Call once the app is built, before serving."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(gen0_threshold, middle, oldest)
    return gc.get_freeze_count()
