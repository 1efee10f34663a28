"""Request migration, fencing and drains in the router, against scripted fake workers
(tests/router/fake_workers.py) over real ZeroMQ sockets: exact commands, exact tokens."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.control.migration import MigrationConfig
from pdserve.errors import ConfigError, RequestFailedError, ServiceUnavailableError
from pdserve.ipc import messages as m
from pdserve.ipc.security import generate_key
from pdserve.router.cluster import ClusterClient
from pdserve.router.policy import RoutingConfig
from pdserve.sampling_params import SamplingParams
from tests.router.fake_workers import FakeWorker

GREEDY5 = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


async def until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


class Harness:
    def __init__(self, model_dir, mode: str, roles: list[tuple[str, str]], **kwargs) -> None:
        self.client = ClusterClient(
            model_dir,
            "tcp://127.0.0.1:0",
            routing=RoutingConfig(mode=mode),
            cluster_key=generate_key(),
            **kwargs,
        )
        self.roles = roles
        self.workers: dict[str, FakeWorker] = {}
        self.deltas: list[int] = []  # every token id the stream delivered, in order

    async def __aenter__(self) -> Harness:
        await self.client.start()
        for worker_id, role in self.roles:
            worker = FakeWorker(
                self.client.ctx, self.client.router_addr, worker_id, role, self.client.cluster_key
            )
            worker.register()
            self.workers[worker_id] = worker
        await until(lambda: len(self.client.pool.workers) == len(self.roles))
        return self

    async def __aexit__(self, *exc) -> None:
        for worker in self.workers.values():
            worker.close()
        await self.client.stop(shutdown_workers=False)

    def start(self, request_id: str = "r", params: SamplingParams = GREEDY5) -> asyncio.Task:
        async def consume():
            final = None
            async for update in self.client.generate(request_id, None, PROMPT, params):
                for delta in update.deltas:
                    self.deltas += delta.token_ids
                final = update.output
            return final

        return asyncio.create_task(consume())

    async def command_on_any(self, kind: type, timeout: float = 5.0) -> tuple[FakeWorker, object]:
        """The worker that receives the next `kind` command, and the command."""
        tasks = {asyncio.create_task(w.next_command(timeout)): w for w in self.workers.values()}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        task = done.pop()
        command = task.result()
        assert isinstance(command, kind), command
        return tasks[task], command

    def assert_nothing_charged(self) -> None:
        for handle in self.client.pool.workers.values():
            assert (handle.outstanding_tokens, handle.num_assigned) == (0, 0), handle.worker_id
            assert handle.pending_prefill_tokens == 0, handle.worker_id
        assert not self.client._attempts and not self.client._children


MIXED2 = [("w0", "mixed"), ("w1", "mixed")]


def test_resumes_with_the_tokens_so_far_and_ignores_the_old_attempt(builtin_model_dir):
    async def main():
        async with Harness(builtin_model_dir, "aggregated", MIXED2) as h:
            task = h.start()
            first, add = await h.command_on_any(m.AddRequest)
            assert (add.request_id, add.prompt_token_ids, add.output_token_ids) == ("r", PROMPT, [])
            first.emit("r", [10])
            first.emit("r", [11])
            await until(lambda: h.deltas == [10, 11])
            h.client.mark_dead(first.worker_id, "exited with code -9")
            second = next(w for w in h.workers.values() if w is not first)
            resumed = await second.next_command()
            assert isinstance(resumed, m.AddRequest)
            assert resumed.request_id == "r~m1"
            assert (resumed.prompt_token_ids, resumed.output_token_ids) == (PROMPT, [10, 11])
            first.emit("r", [99])  # the dead attempt's last words: never reach the client
            second.emit("r~m1", [12])
            second.emit("r~m1", [13, 14], finish_reason="length")
            final = await task
            assert final.outputs[0].token_ids == [10, 11, 12, 13, 14]
            assert h.deltas == [10, 11, 12, 13, 14]
            assert h.client.num_migrations == 1
            await first.no_command()  # a dead worker is not sent an Abort
            h.assert_nothing_charged()

    asyncio.run(main())


def test_a_retryable_failure_moves_the_request_and_a_bad_one_fails(builtin_model_dir):
    async def main():
        async with Harness(builtin_model_dir, "aggregated", MIXED2) as h:
            task = h.start("a")
            first, _ = await h.command_on_any(m.AddRequest)
            first.emit("a", [3])
            first.failed("a", "the engine step failed: RuntimeError()", retryable=True)
            second = next(w for w in h.workers.values() if w is not first)
            resumed = await second.next_command()
            assert (resumed.request_id, resumed.output_token_ids) == ("a~m1", [3])
            second.failed("a~m1", "sampling failed: IndexError()", retryable=False)
            with pytest.raises(RequestFailedError, match="sampling failed"):
                await task
            h.assert_nothing_charged()

    asyncio.run(main())


def test_past_max_migrations_the_request_fails_with_503(builtin_model_dir):
    async def main():
        migration = MigrationConfig(max_migrations=1)
        async with Harness(builtin_model_dir, "aggregated", MIXED2, migration=migration) as h:
            task = h.start()
            first, _ = await h.command_on_any(m.AddRequest)
            h.client.mark_dead(first.worker_id, "exited")
            second = next(w for w in h.workers.values() if w is not first)
            await second.next_command()
            h.client.mark_dead(second.worker_id, "exited")
            with pytest.raises(ServiceUnavailableError, match="max_migrations=1"):
                await task
            h.assert_nothing_charged()

    asyncio.run(main())


def test_no_live_worker_within_the_wait_fails_instead_of_hanging(builtin_model_dir):
    async def main():
        migration = MigrationConfig(migration_wait_s=0.2)
        roles = [("w0", "mixed")]
        async with Harness(builtin_model_dir, "aggregated", roles, migration=migration) as h:
            task = h.start()
            await h.workers["w0"].next_command()
            h.workers["w0"].emit("r", [1])
            await until(lambda: h.deltas == [1])
            h.client.mark_dead("w0", "exited")
            with pytest.raises(ServiceUnavailableError, match="migration_wait_s"):
                await task

    asyncio.run(main())


def test_decode_death_during_reservation_reserves_again_elsewhere(builtin_model_dir):
    """The empty 499 of a cancelled reservation future is gone: the sample is placed
    again, on the other decode worker, and completes."""

    async def main():
        roles = [("p0", "prefill"), ("d0", "decode"), ("d1", "decode")]
        async with Harness(builtin_model_dir, "disaggregated", roles) as h:
            task = h.start()
            dead, reserve = await h.command_on_any(m.ReserveKV)
            assert reserve.request_id == "r"
            h.client.mark_dead(dead.worker_id, "exited")
            other = h.workers["d1" if dead.worker_id == "d0" else "d0"]
            again = await other.next_command()
            assert isinstance(again, m.ReserveKV) and again.request_id == "r~m1"
            other.reserved("r~m1", again.transfer_id)
            prefill = await h.workers["p0"].next_command()
            assert isinstance(prefill, m.PrefillRequest) and prefill.request_id == "r~m1"
            assert prefill.dest.worker_id == other.worker_id
            h.workers["p0"].emit("r~m1", [20])
            other.emit("r~m1", [21, 22, 23])
            other.emit("r~m1", [24], finish_reason="length")
            final = await task
            assert final.outputs[0].token_ids == [20, 21, 22, 23, 24]
            h.assert_nothing_charged()

    asyncio.run(main())


def test_prefill_death_frees_the_reservation_and_prefills_again(builtin_model_dir):
    async def main():
        roles = [("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")]
        async with Harness(builtin_model_dir, "disaggregated", roles) as h:
            decode = h.workers["d0"]
            task = h.start()
            reserve = await decode.next_command()
            decode.reserved("r", reserve.transfer_id)
            dead, _ = await h.command_on_any(m.PrefillRequest)
            h.client.mark_dead(dead.worker_id, "exited with code -9")
            abort = await decode.next_command()
            # The writer's process is gone: the decode worker frees the blocks at once.
            assert abort == m.Abort(["r"], is_writer_absent=True)
            again = await decode.next_command()
            assert isinstance(again, m.ReserveKV) and again.request_id == "r~m1"
            decode.reserved("r~m1", again.transfer_id)
            live = h.workers["p1" if dead.worker_id == "p0" else "p0"]
            assert (await live.next_command()).request_id == "r~m1"
            live.emit("r~m1", [30])
            decode.emit("r~m1", [31, 32, 33, 34], finish_reason="length")
            assert (await task).outputs[0].token_ids == [30, 31, 32, 33, 34]
            h.assert_nothing_charged()

    asyncio.run(main())


def test_lease_expiry_fences_and_the_worker_must_rejoin(builtin_model_dir):
    async def main():
        expired = []
        async with Harness(builtin_model_dir, "aggregated", MIXED2, lease_s=1.0) as h:
            h.client.on_worker_expired = expired.append
            task = h.start()
            hung, _ = await h.command_on_any(m.AddRequest)
            alive = next(w for w in h.workers.values() if w is not hung)
            hung.emit("r", [7])
            for _ in range(20):  # only the live one keeps its lease
                alive.stats()
                await asyncio.sleep(0.1)
            assert expired == [hung.worker_id]
            resumed = await alive.next_command()
            assert (resumed.request_id, resumed.output_token_ids) == ("r~m1", [7])
            hung.stats()  # it wakes up: its old incarnation is told it was fenced
            fence = await hung.next_command()
            assert fence == m.Fence(hung.incarnation)
            hung.emit("r", [66])  # stale: ignored
            alive.emit("r~m1", [8, 9, 10, 11], finish_reason="length")
            assert (await task).outputs[0].token_ids == [7, 8, 9, 10, 11]
            hung.incarnation = "rejoined"
            hung.register()
            await until(lambda: h.client.pool.workers[hung.worker_id].is_alive)

    asyncio.run(main())


def test_a_stalled_engine_loop_is_dead_though_its_heartbeat_runs(builtin_model_dir):
    async def main():
        expired = []
        async with Harness(builtin_model_dir, "aggregated", MIXED2, lease_s=1.0) as h:
            h.client.on_worker_expired = expired.append
            for _ in range(15):
                h.workers["w0"].stats(loop_stalled_s=0.1)
                h.workers["w1"].stats(loop_stalled_s=3.0)  # heartbeat fine, loop stuck
                await asyncio.sleep(0.1)
            assert expired == ["w1"]
            assert [w.worker_id for w in h.client.pool.alive("mixed")] == ["w0"]

    asyncio.run(main())


def test_a_loop_in_a_step_long_by_nature_is_not_stalled(builtin_model_dir):
    """The limit is lease + 2 x the worker's longest legitimate pass: 1 + 2 x 2 = 5 s."""

    async def main():
        expired = []
        async with Harness(builtin_model_dir, "aggregated", MIXED2, lease_s=1.0) as h:
            h.client.on_worker_expired = expired.append
            for _ in range(15):
                h.workers["w0"].stats(loop_stalled_s=4.5, loop_pass_max_s=2.0)  # a long step
                h.workers["w1"].stats(loop_stalled_s=5.5, loop_pass_max_s=2.0)  # past it
                await asyncio.sleep(0.1)
            assert expired == ["w1"]
            assert [w.worker_id for w in h.client.pool.alive("mixed")] == ["w0"]

    asyncio.run(main())


def test_drain_moves_requests_and_takes_no_new_work(builtin_model_dir):
    async def main():
        async with Harness(builtin_model_dir, "aggregated", MIXED2) as h:
            task = h.start()
            first, _ = await h.command_on_any(m.AddRequest)
            first.emit("r", [1, 2])
            await until(lambda: h.deltas == [1, 2])
            report = await h.client.drain(first.worker_id)
            assert (report.num_migrated, report.num_finished) == (1, 0)
            # Alive: told to stop (no prefill worker ever wrote into its blocks).
            assert await first.next_command() == m.Abort(["r"], is_writer_absent=True)
            second = next(w for w in h.workers.values() if w is not first)
            resumed = await second.next_command()
            assert resumed.output_token_ids == [1, 2]
            second.emit("r~m1", [3, 4, 5], finish_reason="length")
            assert (await task).outputs[0].token_ids == [1, 2, 3, 4, 5]
            task = h.start("s")  # new work avoids the drained worker
            assert (await second.next_command()).request_id == "s"
            await first.no_command()
            h.client.drains.resume(first.worker_id)
            assert {w.worker_id for w in h.client.pool.alive("mixed")} == {"w0", "w1"}
            task.cancel()

    asyncio.run(main())


def test_a_new_request_waits_for_a_restarting_worker_instead_of_a_503(builtin_model_dir):
    async def main():
        roles = [("w0", "mixed")]
        async with Harness(builtin_model_dir, "aggregated", roles) as h:
            h.client.mark_dead("w0", "exited with code -9")
            task = h.start()
            await asyncio.sleep(0.2)
            assert not task.done()  # waiting, not failed
            h.workers["w0"].incarnation = "restarted"
            h.workers["w0"].register()
            add = await h.workers["w0"].next_command()
            assert isinstance(add, m.AddRequest) and add.request_id == "r~m1"
            h.workers["w0"].emit("r~m1", [1, 2, 3, 4, 5], finish_reason="length")
            assert (await task).outputs[0].token_ids == [1, 2, 3, 4, 5]

    asyncio.run(main())


def test_a_role_nobody_ever_served_fails_at_once(builtin_model_dir):
    async def main():
        async with Harness(builtin_model_dir, "disaggregated", [("d0", "decode")]) as h:
            with pytest.raises(ServiceUnavailableError, match="no live worker"):
                await h.start()

    asyncio.run(main())


def test_a_role_switch_drains_then_the_worker_serves_in_its_new_role(builtin_model_dir):
    async def main():
        roles = [("p0", "prefill"), ("d0", "decode")]
        async with Harness(builtin_model_dir, "auto", roles) as h:
            prefill = h.workers["p0"]

            async def answer_set_role():
                command = await prefill.next_command()
                assert command == m.SetRole("mixed")
                prefill.role = "mixed"  # the same process registers again in its new role
                prefill.register()

            answering = asyncio.create_task(answer_set_role())
            switch = await h.client.elastic.switch_role("p0", "mixed")
            await answering
            assert (switch.old_role, switch.new_role, switch.num_migrated) == (
                "prefill",
                "mixed",
                0,
            )
            handle = h.client.pool.workers["p0"]
            assert handle.role == "mixed" and handle.is_accepting
            assert handle.incarnation == prefill.incarnation  # not a restart
            assert {w.worker_id for w in h.client.pool.alive("decode")} == {"p0", "d0"}
            with pytest.raises(ConfigError, match="role"):
                await h.client.elastic.switch_role("p0", "x")

    asyncio.run(main())


def test_a_worker_registering_an_unknown_role_is_refused(builtin_model_dir):
    async def main():
        async with Harness(builtin_model_dir, "aggregated", MIXED2) as h:
            key = h.client.cluster_key  # even with the cluster key: a role that does not exist
            rogue = FakeWorker(h.client.ctx, h.client.router_addr, "rogue", "x", key)
            rogue.register()
            await asyncio.sleep(0.3)
            assert "rogue" not in h.client.pool.workers
            rogue.close()

    asyncio.run(main())


def test_tokens_reach_the_client_in_order_whichever_worker_is_faster(builtin_model_dir):
    """The decode worker's second token can overtake the prefill worker's first (two
    sockets): it is held until the first arrives; tokens the client already has are cut."""

    async def main():
        roles = [("p0", "prefill"), ("d0", "decode")]
        async with Harness(builtin_model_dir, "disaggregated", roles) as h:
            prefill, decode = h.workers["p0"], h.workers["d0"]
            task = h.start()
            reserve = await decode.next_command()
            decode.reserved("r", reserve.transfer_id)
            await prefill.next_command()
            decode.emit("r", [41], first_index=1)  # overtakes the first token
            await asyncio.sleep(0.2)
            assert h.deltas == []  # held: token 0 has not arrived
            prefill.emit("r", [40], first_index=0)
            await until(lambda: h.deltas == [40, 41])
            decode.emit("r", [41, 42], first_index=1)  # a repeat of 41: cut, 42 kept
            decode.emit("r", [44], finish_reason="length", first_index=4)  # after a gap
            await asyncio.sleep(0.2)
            assert h.deltas == [40, 41, 42]
            decode.emit("r", [43], first_index=3)
            assert (await task).outputs[0].token_ids == [40, 41, 42, 43, 44]
            assert h.deltas == [40, 41, 42, 43, 44]
            h.assert_nothing_charged()

    asyncio.run(main())
