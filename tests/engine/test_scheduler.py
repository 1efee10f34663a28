"""Scheduler with a real BlockManager and a fake runner (no model): token budget, chunked
prefill, admission order, preemption and recompute, aborts, and the stop rules."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tests.helpers import make_request

EOS = 2


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 64,
    max_num_seqs: int = 16,
    chunked: bool = True,
    block_size: int = 16,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs, budget, enable_chunked_prefill=chunked),
        BlockManager(num_blocks, block_size),
    )


def step(
    scheduler: Scheduler, token_for: Callable[[Request], int] = lambda r: 7
) -> tuple[SchedulerOutput, list[Request]]:
    """One engine step with a fake runner that samples `token_for(request)`."""
    output = scheduler.schedule()
    sampled = {
        item.request.request_id: token_for(item.request)
        for item in output.scheduled
        if item.is_sampling
    }
    return output, scheduler.update_from_output(output, sampled)


def plan(output: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(request id, first token index, number of tokens) of each scheduled request."""
    return [(s.request.request_id, s.start, s.num_new_tokens) for s in output.scheduled]


def assert_idle_and_clean(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    assert not scheduler.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity()


# ---- budget and chunked prefill --------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    scheduler = make_scheduler(budget=64)
    request = make_request(150, "long", max_tokens=2)
    scheduler.add_request(request)
    out, updated = step(scheduler)
    assert plan(out) == [("long", 0, 64)]
    assert not out.scheduled[0].is_sampling and updated == []
    assert request.num_computed_tokens == 64 and request.output_token_ids == []
    out, updated = step(scheduler)
    assert plan(out) == [("long", 64, 64)]
    out, updated = step(scheduler)
    assert plan(out) == [("long", 128, 22)]
    assert updated == [request] and request.output_token_ids == [7]
    out, _ = step(scheduler)
    assert plan(out) == [("long", 150, 1)]
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert_idle_and_clean(scheduler)


def test_budget_is_shared_and_the_last_admitted_prompt_is_chunked():
    scheduler = make_scheduler(budget=20)
    for i in range(3):
        scheduler.add_request(make_request(8, f"r{i}"))
    out, _ = step(scheduler)
    assert plan(out) == [("r0", 0, 8), ("r1", 0, 8), ("r2", 0, 4)]
    assert out.num_batched_tokens == 20
    out, _ = step(scheduler)
    # Running first (decodes of r0, r1, then the rest of r2's prompt).
    assert plan(out) == [("r0", 8, 1), ("r1", 8, 1), ("r2", 4, 4)]


def test_running_requests_are_scheduled_before_waiting_ones():
    scheduler = make_scheduler(budget=32)
    scheduler.add_request(make_request(10, "old"))
    step(scheduler)
    scheduler.add_request(make_request(100, "new"))
    out, _ = step(scheduler)
    assert plan(out) == [("old", 10, 1), ("new", 0, 31)]


def test_budget_exhausted_by_running_leaves_others_running_without_preemption():
    scheduler = make_scheduler(budget=16)
    a, b = make_request(40, "a"), make_request(40, "b")
    scheduler.add_request(a)
    scheduler.add_request(b)
    out, _ = step(scheduler)
    assert plan(out) == [("a", 0, 16)]
    out, _ = step(scheduler)
    assert plan(out) == [("a", 16, 16)]
    out, _ = step(scheduler)
    assert plan(out) == [("a", 32, 8), ("b", 0, 8)]
    out, _ = step(scheduler)
    assert plan(out) == [("a", 40, 1), ("b", 8, 15)]
    assert out.preempted_ids == []
    assert b.status == RequestStatus.RUNNING


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    scheduler = make_scheduler(budget=20, chunked=False)
    for i in range(3):
        scheduler.add_request(make_request(8, f"r{i}"))
    out, _ = step(scheduler)
    assert plan(out) == [("r0", 0, 8), ("r1", 0, 8)]
    assert scheduler.num_waiting == 1
    out, _ = step(scheduler)
    assert plan(out) == [("r0", 8, 1), ("r1", 8, 1), ("r2", 0, 8)]


def test_max_num_seqs_caps_the_running_set():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(4, f"r{i}", max_tokens=2))
    out, _ = step(scheduler)
    assert plan(out) == [("r0", 0, 4), ("r1", 0, 4)]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    out, _ = step(scheduler)  # r0 and r1 finish (max_tokens=2) this step
    assert plan(out) == [("r0", 4, 1), ("r1", 4, 1)]
    out, _ = step(scheduler)
    assert plan(out) == [("r2", 0, 4)]


# ---- order -----------------------------------------------------------------------------


def test_waiting_requests_are_admitted_first_come_first_served():
    scheduler = make_scheduler(budget=10, chunked=False)
    for name in ("a", "b", "c"):
        scheduler.add_request(make_request(10, name, max_tokens=1))
    order = [plan(step(scheduler)[0])[0][0] for _ in range(3)]
    assert order == ["a", "b", "c"]
    assert_idle_and_clean(scheduler)


def test_lower_priority_value_is_admitted_first():
    scheduler = make_scheduler(budget=10, chunked=False)
    for name, priority in (("low", 5), ("high", -1), ("mid1", 0), ("mid2", 0)):
        scheduler.add_request(make_request(10, name, max_tokens=1, priority=priority))
    order = [plan(step(scheduler)[0])[0][0] for _ in range(4)]
    assert order == ["high", "mid1", "mid2", "low"]


def test_waiting_head_that_does_not_fit_blocks_those_behind_it():
    scheduler = make_scheduler(num_blocks=4)
    keeper = make_request(32, "keeper")
    scheduler.add_request(keeper)
    step(scheduler)
    scheduler.add_request(make_request(40, "big"))  # needs 3 blocks
    scheduler.add_request(make_request(4, "small"))  # needs 1 block
    out, _ = step(scheduler)  # keeper's token 33 takes a third block: 1 left
    assert plan(out) == [("keeper", 32, 1)]
    assert scheduler.block_manager.num_free_blocks == 1
    assert scheduler.num_waiting == 2  # small would fit, but it may not skip big


# ---- preemption ------------------------------------------------------------------------


def test_preemption_frees_the_least_important_request_and_it_recomputes_later():
    scheduler = make_scheduler(num_blocks=4)
    bm = scheduler.block_manager
    r0 = make_request(32, "r0", max_tokens=3)
    r1 = make_request(32, "r1", max_tokens=3)
    scheduler.add_request(r0)
    scheduler.add_request(r1)

    out, _ = step(scheduler, lambda r: 100 + r.num_output_tokens)
    assert plan(out) == [("r0", 0, 32), ("r1", 0, 32)]
    assert (r0.block_ids, r1.block_ids) == ([0, 1], [2, 3])
    assert bm.num_free_blocks == 0

    # Both need a third block for token 33; r1 (later) is preempted so r0 can have one.
    out, _ = step(scheduler, lambda r: 100 + r.num_output_tokens)
    assert plan(out) == [("r0", 32, 1)]
    assert out.preempted_ids == ["r1"]
    assert r1.status == RequestStatus.PREEMPTED
    assert (r1.num_computed_tokens, r1.num_preemptions, r1.block_ids) == (0, 1, [])
    assert r1.output_token_ids == [100]  # generated tokens survive preemption
    assert r0.block_ids == [0, 1, 3]  # r1's tail block was reused first
    assert scheduler.num_running == 1 and scheduler.num_waiting == 1

    # r1 needs 3 blocks (1 cached, revived); only 1 is free: it keeps waiting.
    out, _ = step(scheduler, lambda r: 100 + r.num_output_tokens)
    assert plan(out) == [("r0", 33, 1)]
    assert r0.status == RequestStatus.FINISHED_LENGTH
    assert bm.num_free_blocks == 4

    # Readmitted: its first block is still cached, the rest is recomputed in one go.
    out, _ = step(scheduler, lambda r: 100 + r.num_output_tokens)
    assert plan(out) == [("r1", 16, 17)]
    assert r1.block_ids == [2, 3, 1]
    assert r1.num_cached_tokens == 0  # reported cache hits are those at first admission
    assert r1.output_token_ids == [100, 101]
    step(scheduler, lambda r: 100 + r.num_output_tokens)
    assert r1.output_token_ids == [100, 101, 102]
    assert r1.status == RequestStatus.FINISHED_LENGTH
    assert_idle_and_clean(scheduler)


def test_preemption_follows_priority_not_arrival():
    scheduler = make_scheduler(num_blocks=4)
    early = make_request(32, "early", priority=1)
    late = make_request(32, "late", priority=0)
    scheduler.add_request(early)
    scheduler.add_request(late)
    out, _ = step(scheduler)
    assert plan(out) == [("late", 0, 32), ("early", 0, 32)]
    out, _ = step(scheduler)
    assert plan(out) == [("late", 32, 1)]
    assert out.preempted_ids == ["early"]


def test_a_request_preempts_itself_when_only_more_important_ones_remain():
    scheduler = make_scheduler(num_blocks=5)
    r0, r1 = make_request(32, "r0"), make_request(32, "r1")
    scheduler.add_request(r0)
    scheduler.add_request(r1)
    step(scheduler)
    out, _ = step(scheduler)  # r0 takes the last free block; r1 has no one to evict
    assert plan(out) == [("r0", 32, 1)]
    assert out.preempted_ids == ["r1"]
    assert r1.status == RequestStatus.PREEMPTED and r1.block_ids == []
    assert scheduler.running == [r0]


def test_no_admissions_in_a_step_that_preempted():
    scheduler = make_scheduler(num_blocks=4)
    r0, r1 = make_request(32, "r0"), make_request(32, "r1")
    scheduler.add_request(r0)
    scheduler.add_request(r1)
    step(scheduler)
    scheduler.add_request(make_request(1, "tiny"))
    out, _ = step(scheduler)
    assert out.preempted_ids == ["r1"]
    assert plan(out) == [("r0", 32, 1)]
    assert scheduler.block_manager.num_free_blocks == 1  # tiny would fit, but not now
    assert scheduler.num_waiting == 2
    out, _ = step(scheduler)
    # The preempted r1 keeps its place ahead of tiny, and does not fit yet.
    assert plan(out) == [("r0", 33, 1)]


# ---- aborts ----------------------------------------------------------------------------


def test_abort_waiting_request_is_skipped_at_admission():
    scheduler = make_scheduler()
    a, b, c = make_request(8, "a"), make_request(8, "b"), make_request(8, "c")
    for request in (a, b, c):
        scheduler.add_request(request)
    scheduler.abort_requests([a])
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.num_waiting == 2
    out, _ = step(scheduler)
    assert plan(out) == [("b", 0, 8), ("c", 0, 8)]


def test_abort_running_request_frees_its_blocks():
    scheduler = make_scheduler(num_blocks=8)
    request = make_request(40, "r")
    scheduler.add_request(request)
    step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 5
    scheduler.abort_requests([request])
    assert request.status == RequestStatus.FINISHED_ABORTED
    assert request.block_ids == []
    assert_idle_and_clean(scheduler)
    scheduler.abort_requests([request])  # aborting twice is harmless
    assert_idle_and_clean(scheduler)


def test_abort_preempted_request():
    scheduler = make_scheduler(num_blocks=4)
    r0, r1 = make_request(32, "r0", max_tokens=2), make_request(32, "r1")
    scheduler.add_request(r0)
    scheduler.add_request(r1)
    step(scheduler)
    step(scheduler)
    assert r1.status == RequestStatus.PREEMPTED
    scheduler.abort_requests([r1])
    assert scheduler.num_waiting == 0
    assert r0.is_finished
    assert_idle_and_clean(scheduler)


def test_abort_between_schedule_and_update_drops_the_token():
    scheduler = make_scheduler()
    request = make_request(8, "r")
    scheduler.add_request(request)
    output = scheduler.schedule()
    scheduler.abort_requests([request])
    assert scheduler.update_from_output(output, {"r": 7}) == []
    assert request.output_token_ids == []
    assert_idle_and_clean(scheduler)


# ---- stop rules ------------------------------------------------------------------------


def run_with_tokens(request: Request, tokens: list[int]) -> list[int]:
    """Feed `tokens` as the sampled ids, one per step, until the request finishes."""
    scheduler = make_scheduler()
    scheduler.add_request(request)
    feed = iter(tokens)
    while not request.is_finished:
        step(scheduler, lambda r: next(feed))
    assert_idle_and_clean(scheduler)
    return request.output_token_ids


def test_stops_on_eos():
    request = make_request(4, eos_token_ids=(EOS,), max_tokens=10)
    assert run_with_tokens(request, [5, 6, EOS, 8]) == [5, 6, EOS]
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.status.finish_reason == "stop"
    assert request.stop_reason is None


def test_stops_on_a_stop_token_id_and_reports_it():
    request = make_request(4, eos_token_ids=(EOS,), max_tokens=10, stop_token_ids=[9, 11])
    assert run_with_tokens(request, [5, 11, 9]) == [5, 11]
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == 11


def test_stops_at_max_tokens_with_length():
    request = make_request(4, eos_token_ids=(EOS,), max_tokens=3)
    assert run_with_tokens(request, [5, 6, 7, 8]) == [5, 6, 7]
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.status.finish_reason == "length"


def test_min_tokens_ignores_eos_and_stop_ids_until_reached():
    request = make_request(4, eos_token_ids=(EOS,), max_tokens=10, min_tokens=3, stop_token_ids=[9])
    assert run_with_tokens(request, [EOS, 9, EOS, 8]) == [EOS, 9, EOS]
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_ignore_eos_runs_to_max_tokens_but_keeps_stop_ids():
    request = make_request(4, eos_token_ids=(EOS,), max_tokens=4, ignore_eos=True)
    assert run_with_tokens(request, [EOS, EOS, EOS, EOS, 5]) == [EOS] * 4
    assert request.status == RequestStatus.FINISHED_LENGTH
    request = make_request(
        4, eos_token_ids=(EOS,), max_tokens=4, ignore_eos=True, stop_token_ids=[9]
    )
    assert run_with_tokens(request, [EOS, 9, 5]) == [EOS, 9]
    assert request.stop_reason == 9


# ---- prefix cache through the scheduler ------------------------------------------------


def test_second_request_with_the_same_prefix_starts_after_the_cached_blocks():
    scheduler = make_scheduler()
    first = make_request(40, "first", max_tokens=1)
    scheduler.add_request(first)
    step(scheduler)
    second = make_request([*first.prompt_token_ids[:35], 1, 2], "second")
    scheduler.add_request(second)
    out, _ = step(scheduler)
    assert plan(out) == [("second", 32, 5)]
    assert second.num_cached_tokens == 32
    assert second.num_computed_tokens == 37


# ---- a randomised workload against a fake KV pool ------------------------------------------


class FakeKVPool:
    """Stands in for the model: writes each computed token's id into its pool slot and, before
    every step, checks that each scheduled request's context slots hold its own tokens. A
    block shared wrongly, reused while held, or cached with the wrong contents shows up here."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_size = block_manager.block_size
        self.slots = [[None] * self.block_size for _ in range(block_manager.num_blocks)]

    def slot(self, request: Request, position: int) -> tuple[int, int]:
        return request.block_ids[position // self.block_size], position % self.block_size

    def run(self, output: SchedulerOutput) -> None:
        for item in output.scheduled:
            request = item.request
            end = item.start + item.num_new_tokens
            assert len(request.block_ids) * self.block_size >= end
            for position in range(end):
                block_id, offset = self.slot(request, position)
                token_id = request.token_ids(position, position + 1)[0]
                if position < item.start:
                    assert self.slots[block_id][offset] == token_id, (request.request_id, position)
                else:
                    self.slots[block_id][offset] = token_id


def next_token(request: Request) -> int:
    # A function of the context, so equal prompts generate equal outputs (and cacheable blocks).
    context = request.token_ids(max(0, request.num_tokens - 3), request.num_tokens)
    return (sum(context) * 31 + len(context)) % 50


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_every_invariant(seed, chunked, prefix_caching):
    rng = random.Random(seed)
    # Without chunking a whole prompt (plus outputs, on recompute) must fit one step.
    block_size, budget, max_num_seqs = 4, 24 if chunked else 96, 6
    bm = BlockManager(32, block_size, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget, chunked), bm)
    pool = FakeKVPool(bm)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(1, 60))] for _ in range(4)]
    requests = []
    for i in range(40):
        prompt = rng.choice(stems)[: rng.randrange(1, 60)] + [rng.randrange(50)] * rng.randrange(3)
        request = make_request(
            prompt, f"r{i}", max_tokens=rng.randrange(1, 20), priority=rng.randrange(3)
        )
        requests.append(request)
    pending = list(requests)
    aborted: set[str] = set()
    num_steps = num_preemptions = 0
    while pending or scheduler.has_unfinished_requests():
        for _ in range(rng.randrange(3)):
            if pending:
                scheduler.add_request(pending.pop(0))
        added = requests[: len(requests) - len(pending)]
        if rng.random() < 0.05:
            victim = rng.choice(added)
            if not victim.is_finished:
                aborted.add(victim.request_id)
                scheduler.abort_requests([victim])
        output = scheduler.schedule()
        num_preemptions += len(output.preempted_ids)
        assert output.num_batched_tokens <= budget
        assert scheduler.num_running <= max_num_seqs
        assert len({s.request.request_id for s in output.scheduled}) == len(output.scheduled)
        for item in output.scheduled:
            assert item.start == item.request.num_computed_tokens
            assert item.num_new_tokens >= 1
            if not chunked:
                assert item.is_sampling  # whole prompts, then one token at a time
        pool.run(output)
        sampled = {
            s.request.request_id: next_token(s.request) for s in output.scheduled if s.is_sampling
        }
        scheduler.update_from_output(output, sampled)
        held = sum(len(r.block_ids) for r in scheduler.running)
        assert sum(b.ref_count for b in bm.blocks) == held
        bm.check_integrity()
        num_steps += 1
        assert num_steps < 5000, "no progress"
    assert_idle_and_clean(scheduler)
    assert num_preemptions > 0  # the pool of 32 blocks is meant to be tight
    assert any(r.num_cached_tokens for r in requests) == prefix_caching
    for request in requests:
        if request.request_id in aborted:
            assert request.status == RequestStatus.FINISHED_ABORTED
        else:
            assert request.status == RequestStatus.FINISHED_LENGTH
            assert request.num_output_tokens == request.max_tokens
