"""The router process's garbage collector: start-up objects frozen out of its collections.

Why: the router's event loop answers every HTTP request, and CPython's cyclic collector
stops it for as long as a collection takes. A full (generation 2) collection walks every
tracked object, and after start-up that is ~200k of them (FastAPI and pydantic models,
the tokenizer, prometheus, ZeroMQ), ~50-150 ms on this project's hosts. A burst of
connections creates long-lived objects (a protocol, transport, parser and flow control
per connection) fast enough to trigger one or two full collections per 2000 connections:
measured under a burst of 2000-4000 requests at once, 0.4-0.8 s of the router's time went
to the collector and the refusals waited behind it (docs/benchmarks.md, Overload, "Where
a burst's refusal time goes").

`freeze_startup_objects` collects once and then moves everything alive into the
permanent generation (`gc.freeze`), which the collector never walks: later collections
cost what was created since start-up, not the whole process. Frozen objects are still
freed by reference counting; only cycles among them (start-up state, alive for the life
of the process anyway) are never reclaimed.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect, then exempt every object alive now from future collections. Returns the
    number of objects frozen in all (`gc.get_freeze_count`). Call once the app is built,
    before serving."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
