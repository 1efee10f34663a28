"""Runs of identical decode steps: `decode_run_length` foresees them, and `advance_decodes`
leaves exactly the state the same steps taken one by one leave (block ids, the free
queue's order, the prefix cache, statuses, tokens; the same KV events, batched
differently)."""

from __future__ import annotations

import pytest

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from tests.helpers import make_request


def token(request_id: str, n: int) -> int:
    return 1000 + 31 * n + len(request_id)


def build(num_blocks: int = 40, max_num_seqs: int = 8, waiting: bool = False) -> Scheduler:
    """Four requests past their prompts (14, 15, 30, 39 tokens computed, one token out),
    with 3 / 20 / 6 / 9 tokens still to go."""
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs, max_num_batched_tokens=256),
        BlockManager(num_blocks, block_size=16, record_events=True),
    )
    for i, (prompt, max_tokens) in enumerate(((14, 4), (15, 21), (30, 7), (39, 10))):
        prompt_ids = [100 * i + t for t in range(prompt)]
        scheduler.add_request(make_request(prompt_ids, f"r{i}", max_tokens=max_tokens))
    one_step(scheduler)
    if waiting:
        scheduler.add_request(make_request(5, "late"))
    return scheduler


def one_step(scheduler: Scheduler) -> None:
    output = scheduler.schedule()
    sampled = {
        s.request.request_id: token(s.request.request_id, s.request.num_output_tokens)
        for s in output.scheduled
        if s.is_sampling
    }
    scheduler.update_from_output(output, sampled)


def state(scheduler: Scheduler) -> tuple:
    bm = scheduler.block_manager
    requests = sorted(
        [*scheduler.running, *(r for *_, r in scheduler._waiting)], key=lambda r: r.request_id
    )
    return (
        [r.request_id for r in scheduler.running],
        [(r.request_id, r.block_ids, r.output_token_ids, r.num_computed_tokens) for r in requests],
        list(bm._free),
        dict(bm._cached),
        sorted((type(e).__name__, h) for e in bm.events.drain() for h in e.block_hashes),
    )


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_advance_decodes_leaves_what_stepping_leaves(num_steps):
    stepped, advanced = build(), build()
    assert advanced.decode_run_length(100) == 3  # r0 stops at its 4th token
    for _ in range(num_steps):
        one_step(stepped)
    batch = advanced.advance_decodes(
        num_steps,
        {
            r.request_id: [token(r.request_id, r.num_output_tokens + i) for i in range(num_steps)]
            for r in advanced.running
        },
    )
    assert [r.request_id for r in batch] == ["r0", "r1", "r2", "r3"]
    assert state(advanced) == state(stepped)
    assert (batch[0].status == RequestStatus.FINISHED_LENGTH) == (num_steps == 3)
    advanced.block_manager.check_integrity()


def test_the_run_is_as_long_as_the_free_blocks_allow():
    # The four hold 1 + 1 + 2 + 3 = 7 blocks. New blocks: r1 at the 2nd step, r0 and r2
    # at the 3rd (r3 not before its 10th).
    for num_blocks, expected in ((10, 3), (9, 2), (8, 2), (7, 1)):
        scheduler = build(num_blocks=num_blocks)
        assert scheduler.block_manager.num_free_blocks == num_blocks - 7
        assert scheduler.decode_run_length(100) == expected


def test_no_run_while_a_waiting_request_could_be_admitted():
    assert build(waiting=True).decode_run_length(100) == 0
    assert build(waiting=True, max_num_seqs=4).decode_run_length(100) == 3  # no slot
    assert build().decode_run_length(2) == 2  # the limit


def test_no_run_over_a_prefill_or_a_possible_stop_token():
    scheduler = build()
    scheduler.running[0].sampling_params = make_request(1, "x", stop_token_ids=[5]).sampling_params
    assert scheduler.decode_run_length(100) == 1
    prefilling = Scheduler(SchedulerConfig(8, 8), BlockManager(40, 16))
    prefilling.add_request(make_request(30, "long"))
    one_step(prefilling)  # 8 of 30 prompt tokens computed
    assert prefilling.decode_run_length(100) == 0
