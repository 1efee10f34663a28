"""`UpdateQueue`: a request's stream updates between the receive loop and its reader.

An `asyncio.Queue` of `StreamUpdate`s grows by one item per engine step while its reader
is not reading (a client that stops reading its SSE stream blocks the response's writes,
so the generation stops pulling), and each item carries the cumulative `RequestOutput`:
the queue would hold O(T^2) tokens for T steps. Here updates that arrive while the reader
is away are merged into one pending update instead: the new deltas appended per sample,
the latest cumulative output kept, the older dropped. So the queue holds O(T) tokens
however slow the reader, and a reader that keeps up sees exactly the updates it always did.

Merging keeps what a reader can observe: the concatenated text, token ids and logprobs of
each sample in order, the finish reason of the update that finished it, and `finished`
of the last. An exception put after updates is raised only once they have been read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pdserve.outputs import SampleDelta, StreamUpdate


@dataclass(slots=True)
class _Merged:
    """The deltas of one sample across merged updates, as lists to join once."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: SampleDelta) -> None:
        self.texts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    def delta(self) -> SampleDelta:
        return SampleDelta(
            self.index,
            "".join(self.texts),
            self.token_ids,
            self.logprobs,
            self.finish_reason,
            self.stop_reason,
        )


class UpdateQueue:
    """Holds at most one (merged) update and one error; `get` waits for either."""

    def __init__(self) -> None:
        self._pending: StreamUpdate | None = None
        self._merged: dict[int, _Merged] | None = None  # set once two updates merged
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put_nowait(self, item: StreamUpdate | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        elif self._pending is None:
            self._pending = item
        else:
            self._merge(item)
        self._ready.set()

    def _merge(self, update: StreamUpdate) -> None:
        assert self._pending is not None
        if self._merged is None:
            self._merged = {}
            self._add_deltas(self._pending.deltas)
        self._add_deltas(update.deltas)
        self._pending = StreamUpdate([], update.output, update.finished)

    def _add_deltas(self, deltas: list[SampleDelta]) -> None:
        assert self._merged is not None
        for delta in deltas:
            self._merged.setdefault(delta.index, _Merged(delta.index)).add(delta)

    def qsize(self) -> int:
        return (self._pending is not None) + (self._error is not None)

    async def get(self) -> StreamUpdate | BaseException:
        while self._pending is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._pending is None:
            error, self._error = self._error, None
            return error  # type: ignore[return-value]
        update, self._pending = self._pending, None
        if self._merged is not None:
            deltas = [m.delta() for _, m in sorted(self._merged.items())]
            update = StreamUpdate(deltas, update.output, update.finished)
            self._merged = None
        return update
