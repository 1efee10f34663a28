"""A role switch lets the worker's running requests finish before it switches, and moves
only what is still running after its drain timeout (router/elastic.py), against scripted
fake workers over real ZeroMQ (tests/router/fake_workers.py): exact commands, exact
tokens, exact counts of finished and migrated requests."""

from __future__ import annotations

import asyncio

from pdserve.ipc import messages as m
from tests.router.test_migration import MIXED2, Harness, until


async def answer_set_role(worker, role: str) -> None:
    """The worker's side of a switch: SetRole, then it registers again in the new role."""
    command = await worker.next_command()
    assert command == m.SetRole(role), command
    worker.role = role
    worker.register()


async def running_on_one(h: Harness):
    """Request "r" running on one worker (tokens [1, 2] streamed); the other is idle."""
    task = h.start()
    first, _ = await h.command_on_any(m.AddRequest)
    second = next(w for w in h.workers.values() if w is not first)
    first.emit("r", [1, 2])
    await until(lambda: h.deltas == [1, 2])
    return task, first, second


def test_a_switch_lets_running_requests_finish_on_the_old_role(builtin_model_dir):
    async def main():
        async with Harness(builtin_model_dir, "auto", MIXED2) as h:
            task, first, second = await running_on_one(h)
            switching = asyncio.create_task(
                h.client.elastic.switch_role(first.worker_id, "prefill", drain_timeout_s=30.0)
            )
            handle = h.client.pool.workers[first.worker_id]
            await until(lambda: handle.is_draining)
            # New work goes to the other worker; the running request is neither moved
            # nor aborted, and the worker is not told to switch while it runs.
            other = h.start("s")
            add = await second.next_command()
            assert isinstance(add, m.AddRequest) and add.request_id == "s"
            await first.no_command(0.5)
            assert not switching.done()
            first.emit("r", [3, 4, 5], finish_reason="length")
            await answer_set_role(first, "prefill")
            switch = await switching
            assert (switch.old_role, switch.new_role) == ("mixed", "prefill")
            assert (switch.num_finished, switch.num_migrated) == (1, 0)
            assert (await task).outputs[0].token_ids == [1, 2, 3, 4, 5]
            assert h.client.num_migrations == 0
            assert handle.role == "prefill" and handle.is_accepting
            second.emit("s", [7, 8, 9, 10, 11], finish_reason="length")
            assert (await other).outputs[0].token_ids == [7, 8, 9, 10, 11]
            h.assert_nothing_charged()

    asyncio.run(main())


def test_what_is_still_running_after_the_timeout_migrates(builtin_model_dir):
    async def main():
        async with Harness(builtin_model_dir, "auto", MIXED2) as h:
            task, first, second = await running_on_one(h)
            switching = asyncio.create_task(
                h.client.elastic.switch_role(first.worker_id, "decode", drain_timeout_s=2.0)
            )
            # Within the timeout nothing moves (0.3 s checked of 2 s: room for a slow
            # host between the switch starting and the check); after it, the request is aborted on the
            # draining worker and resumes on the other from the tokens it streamed.
            await first.no_command(0.3)
            assert await first.next_command() == m.Abort(["r"], is_writer_absent=True)
            resumed = await second.next_command()
            assert isinstance(resumed, m.AddRequest) and resumed.request_id == "r~m1"
            assert resumed.output_token_ids == [1, 2]
            await answer_set_role(first, "decode")
            switch = await switching
            assert (switch.num_finished, switch.num_migrated) == (0, 1)
            assert h.client.num_migrations == 1
            second.emit("r~m1", [3, 4, 5], finish_reason="length")
            assert (await task).outputs[0].token_ids == [1, 2, 3, 4, 5]
            h.assert_nothing_charged()

    asyncio.run(main())


def test_a_zero_timeout_migrates_at_once(builtin_model_dir):
    async def main():
        async with Harness(builtin_model_dir, "aggregated", MIXED2) as h:
            h.client.elastic.drain_timeout_s = 0.0  # the serve setting role_switch_drain_s
            task = h.start()
            first, _ = await h.command_on_any(m.AddRequest)
            second = next(w for w in h.workers.values() if w is not first)
            first.emit("r", [1])
            await until(lambda: h.deltas == [1])
            switching = asyncio.create_task(h.client.elastic.switch_role(first.worker_id, "mixed"))
            assert (await switching).num_migrated == 0  # already that role: nothing to do
            switching = asyncio.create_task(h.client.elastic.switch_role(first.worker_id, "decode"))
            assert await first.next_command(1.0) == m.Abort(["r"], is_writer_absent=True)
            await answer_set_role(first, "decode")
            assert (await switching).num_migrated == 1
            resumed = await second.next_command()
            assert resumed.output_token_ids == [1]
            second.emit("r~m1", [2, 3, 4, 5], finish_reason="length")
            assert (await task).outputs[0].token_ids == [1, 2, 3, 4, 5]

    asyncio.run(main())
