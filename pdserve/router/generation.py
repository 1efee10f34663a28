"""One HTTP request's generation: its prompts' client streams, run together.

Owns `Generation` (and `PromptInput`, what it runs): the streams of one request's prompts
merged as updates arrive (`merge_streams`), the metrics trackers fed, the gateway lease
told when each prompt starts (admission) and closed when it ends, each wait bounded by
the lease's deadline and cut short by an eviction, and every prompt without its final
update aborted however the iteration ends.

Errors: a `RequestFailedError` before any prompt produced output becomes a
`ServiceUnavailableError` (503: nothing was produced, so retrying is safe; in
disaggregated mode this is what an overloaded prefill pool looks like); after that it
propagates as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio

from pdserve.errors import RequestFailedError, ServiceUnavailableError
from pdserve.outputs import RequestOutput, StreamUpdate
from pdserve.router.client import EngineClient
from pdserve.router.gateway import Lease
from pdserve.router.metrics import RouterMetrics
from pdserve.router.protocol import UsageInfo
from pdserve.sampling_params import SamplingParams

T = TypeVar("T")
Update = tuple[int, StreamUpdate]  # (prompt index, update)


@dataclass(frozen=True, slots=True)
class PromptInput:
    text: str | None  # the prompt's text when it came as text (or was rendered from chat)
    token_ids: list[int]
    params: SamplingParams


class Generation:
    """The client streams of one HTTP request's prompts, run together.

    `updates()` yields `(prompt_index, update)` as they arrive; however it ends, every
    prompt without its final update is aborted and its stream closed, and the lease is
    closed. Each wait for the next update is bounded by the lease's deadline and ends
    early when admission evicts the request.
    """

    def __init__(
        self,
        client: EngineClient,
        request_id: str,
        inputs: Sequence[PromptInput],
        metrics: RouterMetrics,
        arrival: float,
        lease: Lease,
        priority: int = 0,
        on_done: Callable[[float | None, float | None], None] | None = None,
    ) -> None:
        self.client = client
        self.arrival = arrival
        self.on_done = on_done  # (TTFT s, TPOT s) per prompt as it ends; None: it failed
        self._first_at: dict[int, float] = {}  # prompt index -> first token (monotonic)
        self._last_at: dict[int, float] = {}
        self._num_tokens = [0] * len(inputs)
        self.inputs = list(inputs)
        self.request_ids = [f"{request_id}-{i}" for i in range(len(inputs))]
        self.lease = lease
        self.priority = priority
        self._trackers = [metrics.start_request(len(p.token_ids), arrival) for p in inputs]
        self._finished: set[int] = set()
        self._started: set[int] = set()  # prompts whose first update arrived
        self._num_completion_tokens = 0
        self._num_cached_tokens = [0] * len(self.inputs)
        self._waiter: asyncio.Timeout | None = None
        if lease.ticket is not None:
            lease.ticket.on_evict.append(self._stop_waiting)

    @property
    def usage(self) -> UsageInfo:
        num_prompt_tokens = sum(len(p.token_ids) for p in self.inputs)
        num_cached = sum(self._num_cached_tokens)
        return UsageInfo.of(num_prompt_tokens, self._num_completion_tokens, num_cached)

    async def updates(self) -> AsyncIterator[Update]:
        streams = [
            self.client.generate(request_id, p.text, p.token_ids, p.params, self.priority)
            for request_id, p in zip(self.request_ids, self.inputs, strict=True)
        ]
        try:
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                while (item := await self._next(merged)) is not None:
                    index, update = item
                    self._observe(index, update)
                    yield index, update
        except RequestFailedError as exc:
            if self._started:
                raise
            # Nothing was produced: overload or a lost worker, and safe to retry.
            raise ServiceUnavailableError(f"{exc}; retry later") from exc
        finally:
            with anyio.CancelScope(shield=True):
                await self._close(streams)
            usage = self.usage
            self.lease.close(usage.prompt_tokens, usage.completion_tokens)
            self._report()

    def _report(self) -> None:
        """Each prompt's TTFT and TPOT (per sample) to `on_done`: None for one that failed
        before its first token; one cut off after it (a client gone) is not reported."""
        if self.on_done is None:
            return
        for index, prompt in enumerate(self.inputs):
            first = self._first_at.get(index)
            if first is None:
                self.on_done(None, None)
            elif index in self._finished:
                per_sample = self._num_tokens[index] / prompt.params.n
                span = self._last_at[index] - first
                self.on_done(
                    first - self.arrival, span / (per_sample - 1) if per_sample >= 2 else None
                )

    async def _next(self, merged: AsyncIterator[Update]) -> Update | None:
        """The next update, within the deadline and unless evicted; None at the end."""
        ticket = self.lease.ticket
        if ticket is not None and ticket.is_evicted:
            raise self.lease.expired()
        left = self.lease.seconds_left()
        when = None if left is None else asyncio.get_running_loop().time() + left
        try:
            async with asyncio.timeout_at(when) as self._waiter:
                return await merged.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise self.lease.expired() from None
        finally:
            self._waiter = None

    def _stop_waiting(self) -> None:
        """Admission evicted the request: end the wait for its first update now."""
        if self._waiter is not None:
            self._waiter.reschedule(asyncio.get_running_loop().time())

    def _observe(self, index: int, update: StreamUpdate) -> None:
        self._trackers[index].observe(update)
        num_tokens = sum(len(d.token_ids) for d in update.deltas)
        self._num_completion_tokens += num_tokens
        if num_tokens:
            now = time.monotonic()
            self._first_at.setdefault(index, now)
            self._last_at[index] = now
            self._num_tokens[index] += num_tokens
        self._num_cached_tokens[index] = update.output.num_cached_tokens
        if index not in self._started:
            self._started.add(index)
            prompt = self.inputs[index]
            self.lease.started(len(prompt.token_ids) * prompt.params.n)
        if update.finished:
            self._finished.add(index)

    async def collect(self) -> list[RequestOutput]:
        """Run to the end; the final output of each prompt, in prompt order."""
        outputs: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(self.updates()) as updates:
            async for index, update in updates:
                outputs[index] = update.output
        if len(self._finished) < len(self.inputs):
            raise RequestFailedError("a stream ended before its request finished")
        return [outputs[i] for i in range(len(self.inputs))]

    async def _close(self, streams: list[AsyncIterator[StreamUpdate]]) -> None:
        for index, request_id in enumerate(self.request_ids):
            if index not in self._finished:
                self._trackers[index].abort(self.inputs[index].params.n)
                await self.client.abort(request_id)
        for stream_ in streams:
            aclose = getattr(stream_, "aclose", None)
            if aclose is not None:
                await aclose()


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they arrive, tagged with the iterator's index.

    One stream (the common case) is iterated directly; several are each advanced by a task
    of their own, and pending tasks are cancelled when the merge is closed.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    pending = {asyncio.ensure_future(_anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                is_item, item = task.result()
                if is_item:
                    pending[asyncio.ensure_future(_anext(streams[index]))] = index
                    yield index, item
    finally:
        for task in pending:
            task.cancel()
        if pending:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(pending)
            for task in pending:  # a failure after the merge was closed: nobody wants it
                if not task.cancelled():
                    task.exception()


async def _anext(stream_: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await stream_.__anext__()
    except StopAsyncIteration:
        return False, None
