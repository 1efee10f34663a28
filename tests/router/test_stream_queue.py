"""`UpdateQueue`: a reader that keeps up sees every update as it was put; one that falls
behind finds the missed updates merged into one, so the queue never holds more than one
update however many steps pass."""

from __future__ import annotations

import pytest

from pdserve.outputs import CompletionOutput, Logprob, RequestOutput, SampleDelta, StreamUpdate
from pdserve.router.stream_queue import UpdateQueue

pytestmark = pytest.mark.anyio


def update(step: int, deltas: list[SampleDelta], finished: bool = False) -> StreamUpdate:
    outputs = [CompletionOutput(0, "x" * step, list(range(step)))]
    return StreamUpdate(deltas, RequestOutput("r", None, [1], outputs, finished), finished)


async def test_a_reader_that_keeps_up_gets_each_update_unchanged():
    queue = UpdateQueue()
    first = update(1, [SampleDelta(0, "a", [5])])
    queue.put_nowait(first)
    assert await queue.get() is first
    second = update(2, [SampleDelta(0, "b", [6])], finished=True)
    queue.put_nowait(second)
    assert await queue.get() is second


async def test_missed_updates_merge_per_sample_keeping_the_latest_output():
    queue = UpdateQueue()
    lp = [{5: Logprob(-0.5, 1)}]
    queue.put_nowait(update(1, [SampleDelta(0, "He", [5], lp), SampleDelta(1, "A", [9])]))
    queue.put_nowait(update(2, [SampleDelta(1, "B", [8])]))
    last = update(3, [SampleDelta(0, "llo", [6, 7], lp + lp, "stop", "!")], finished=True)
    queue.put_nowait(last)
    assert queue.qsize() == 1
    merged = await queue.get()
    assert merged.output is last.output and merged.finished
    assert merged.deltas == [
        SampleDelta(0, "Hello", [5, 6, 7], lp * 3, "stop", "!"),
        SampleDelta(1, "AB", [9, 8], None, None, None),
    ]


async def test_the_queue_holds_one_update_however_many_steps_are_missed():
    queue = UpdateQueue()
    for step in range(1, 1001):
        queue.put_nowait(update(step, [SampleDelta(0, "t", [step])]))
    assert queue.qsize() == 1
    merged = await queue.get()
    assert merged.deltas[0].token_ids == list(range(1, 1001))
    assert merged.deltas[0].text == "t" * 1000
    assert merged.output.outputs[0].token_ids == list(range(1000))  # only the latest


async def test_an_error_comes_after_the_updates_before_it():
    queue = UpdateQueue()
    queue.put_nowait(update(1, [SampleDelta(0, "a", [5])]))
    error = RuntimeError("worker lost")
    queue.put_nowait(error)
    assert isinstance(await queue.get(), StreamUpdate)
    assert await queue.get() is error
    assert queue.qsize() == 0
