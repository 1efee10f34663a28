"""BlockManager: exact block ids, ref counts, prefix-cache hits and misses, LRU eviction,
ask-then-act allocation and the integrity check."""

from __future__ import annotations

import pytest

import pdserve.engine.request as request_module
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request
from tests.helpers import make_request


def admit(bm: BlockManager, request: Request) -> list[int]:
    """What the scheduler does at admission: reuse the cached prefix, compute the rest, and
    register the full blocks. Returns the cached block ids."""
    cached = bm.find_cached_blocks(request)
    num_new = request.num_tokens - len(cached) * bm.block_size
    assert bm.can_allocate(request, num_new, cached)
    bm.allocate(request, num_new, cached)
    request.num_computed_tokens = len(cached) * bm.block_size + num_new
    bm.commit_full_blocks(request)
    return cached


def extend(bm: BlockManager, request: Request, num_new: int) -> None:
    """Compute `num_new` more tokens of a running request (a decode or a prefill chunk)."""
    bm.allocate(request, num_new)
    request.num_computed_tokens += num_new
    bm.commit_full_blocks(request)


def ref_counts(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm.blocks]


def free_queue(bm: BlockManager) -> list[int]:
    return list(bm._free)


# ---- allocation ----------------------------------------------------------------------------


def test_fresh_pool_hands_out_block_ids_in_order():
    bm = BlockManager(num_blocks=8, block_size=16)
    first, second = make_request(40, "a"), make_request(17, "b")
    bm.allocate(first, 40)
    bm.allocate(second, 17)
    assert first.block_ids == [0, 1, 2]
    assert second.block_ids == [3, 4]
    assert ref_counts(bm) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    bm.check_integrity()


def test_a_new_block_is_taken_only_when_the_last_one_is_full():
    bm = BlockManager(num_blocks=8, block_size=16)
    request = make_request(40)
    extend(bm, request, 40)  # 40 tokens: blocks 0, 1 full, block 2 holds 8
    assert bm.num_blocks_to_take(request, 8) == 0
    request.output_token_ids += list(range(9))
    extend(bm, request, 8)  # 48 tokens: block 2 is now full
    assert request.block_ids == [0, 1, 2]
    assert bm.num_blocks_to_take(request, 1) == 1
    extend(bm, request, 1)
    assert request.block_ids == [0, 1, 2, 3]
    assert bm.num_free_blocks == 4


def test_cannot_allocate_when_full_and_allocate_then_raises():
    bm = BlockManager(num_blocks=4, block_size=16)
    holder = make_request(64, "holder")
    extend(bm, holder, 64)
    assert bm.num_free_blocks == 0
    other = make_request(1, "other")
    assert not bm.can_allocate(other, 1)
    assert not bm.can_allocate(holder, 1)  # a 65th token needs a fifth block
    assert bm.can_allocate(holder, 0)
    with pytest.raises(RuntimeError, match="other"):
        bm.allocate(other, 1)
    assert other.block_ids == []
    assert bm.num_free_blocks == 0
    assert ref_counts(bm) == [1, 1, 1, 1]
    bm.check_integrity()


def test_can_allocate_counts_exactly_the_free_blocks_needed():
    bm = BlockManager(num_blocks=4, block_size=16)
    request = make_request(64)
    assert bm.can_allocate(request, 64)
    assert not bm.can_allocate(request, 65)
    assert bm.num_blocks_to_take(request, 33) == 3


def test_try_allocate_takes_what_allocate_would_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=16)
    request = make_request(64)
    extend(bm, request, 20)  # blocks 0, 1; 20 of 32 slots used
    assert bm.try_allocate(request, 12)  # fits in block 1: nothing taken
    assert request.block_ids == [0, 1] and bm.num_free_blocks == 2
    assert not bm.try_allocate(request, 45)  # 65 tokens: 5 blocks, 2 free
    assert request.block_ids == [0, 1] and bm.num_free_blocks == 2
    assert bm.try_allocate(request, 44)  # 64 tokens: exactly blocks 2 and 3
    assert request.block_ids == [0, 1, 2, 3] and bm.num_free_blocks == 0
    assert ref_counts(bm) == [1, 1, 1, 1]
    bm.check_integrity()


def test_free_after_finish_or_abort_restores_every_block():
    bm = BlockManager(num_blocks=8, block_size=16)
    finished, aborted = make_request(50, "done"), make_request(20, "gone")
    admit(bm, finished)
    extend(bm, aborted, 10)  # aborted mid-prefill
    bm.free(finished)
    bm.free(aborted)
    assert finished.block_ids == [] and aborted.block_ids == []
    assert bm.num_free_blocks == bm.num_blocks == 8
    assert ref_counts(bm) == [0] * 8
    bm.check_integrity()


# ---- prefix cache ----------------------------------------------------------------------


def test_shared_prefix_shares_blocks_and_counts_references():
    bm = BlockManager(num_blocks=8, block_size=16)
    first = make_request(40, "first")
    admit(bm, first)  # blocks 0, 1 full and cached; block 2 partial
    assert bm.num_cached_blocks == 2
    second = make_request([*first.prompt_token_ids[:32], *range(10)], "second")
    assert bm.find_cached_blocks(second) == [0, 1]
    assert bm.num_blocks_to_take(second, 10, [0, 1]) == 1  # held blocks cost nothing
    assert admit(bm, second) == [0, 1]
    assert second.block_ids == [0, 1, 3]
    assert second.num_computed_tokens == 42
    assert ref_counts(bm)[:4] == [2, 2, 1, 1]
    assert bm.num_free_blocks == 4

    bm.free(first)
    assert ref_counts(bm)[:4] == [1, 1, 0, 1]
    assert bm.num_free_blocks == 5
    bm.free(second)
    assert bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 2  # freed blocks keep their contents
    bm.check_integrity()


def test_cached_prefix_never_includes_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=16)
    tokens = list(range(32))
    admit(bm, make_request(tokens, "a"))
    assert bm.num_cached_blocks == 2
    # Exactly 32 tokens: the last one must be computed to get logits, so 1 block, not 2.
    assert bm.find_cached_blocks(make_request(tokens, "b")) == [0]
    assert bm.find_cached_blocks(make_request([*tokens, 7], "c")) == [0, 1]
    assert bm.find_cached_blocks(make_request(tokens[:16], "d")) == []
    assert bm.find_cached_blocks(make_request(tokens[:17], "e")) == [0]


def test_only_blocks_full_of_computed_tokens_are_cached():
    bm = BlockManager(num_blocks=8, block_size=16)
    request = make_request(40)
    extend(bm, request, 20)
    assert bm.num_cached_blocks == 1
    extend(bm, request, 11)
    assert bm.num_cached_blocks == 1
    extend(bm, request, 9)
    assert bm.num_cached_blocks == 2
    # Generated tokens are cached too once their block fills.
    request.output_token_ids += list(range(9))
    extend(bm, request, 9)
    assert bm.num_cached_blocks == 3
    probe = make_request([*request.prompt_token_ids, *request.output_token_ids, 1], "probe")
    assert bm.find_cached_blocks(probe) == [0, 1, 2]


def test_a_miss_in_the_middle_ends_the_hit_chain():
    bm = BlockManager(num_blocks=8, block_size=16)
    tokens = list(range(64))
    admit(bm, make_request(tokens, "a"))
    changed = [*tokens[:16], 9999, *tokens[17:]]  # second block differs
    assert bm.find_cached_blocks(make_request(changed, "b")) == [0]
    changed_first = [9999, *tokens[1:]]  # later blocks equal, but the chain differs
    assert bm.find_cached_blocks(make_request(changed_first, "c")) == []


def test_stored_token_mismatch_is_a_miss(monkeypatch):
    bm = BlockManager(num_blocks=8, block_size=16)
    tokens = list(range(48))
    admit(bm, make_request(tokens, "a"))
    assert bm.find_cached_blocks(make_request([*tokens, 1], "b")) == [0, 1, 2]
    monkeypatch.setattr(bm.blocks[1], "token_ids", tuple(range(100, 116)))
    assert bm.find_cached_blocks(make_request([*tokens, 1], "c")) == [0]


def test_hash_collision_between_different_blocks_is_a_miss(monkeypatch):
    # Every block now hashes to its parent + 1: any two 16-token prompts collide.
    monkeypatch.setattr(request_module, "hash_block", lambda parent, tokens: parent + 1)
    bm = BlockManager(num_blocks=8, block_size=16)
    admit(bm, make_request(list(range(32)), "a"))
    other = make_request(list(range(500, 532)), "b")
    assert other.update_block_hashes(16) == [1, 2]
    assert bm.find_cached_blocks(other) == []
    admit(bm, other)
    assert other.block_ids == [2, 3]  # computed afresh, not shared
    assert ref_counts(bm)[:4] == [1, 1, 1, 1]
    bm.check_integrity()


def test_freed_cached_blocks_are_revived_by_a_hit():
    bm = BlockManager(num_blocks=8, block_size=16)
    first = make_request(40, "first")
    admit(bm, first)
    bm.free(first)
    # Free queue: unhashed partial block 2 first, then never-used 3..7, then 1 before 0.
    assert free_queue(bm) == [2, 3, 4, 5, 6, 7, 1, 0]
    again = make_request(first.prompt_token_ids, "again")
    cached = bm.find_cached_blocks(again)
    assert cached == [0, 1]
    assert bm.num_blocks_to_take(again, 8, cached) == 3  # 2 revived + 1 new
    admit(bm, again)
    assert again.block_ids == [0, 1, 2]
    assert bm.num_free_blocks == 5
    bm.check_integrity()


def test_duplicate_prompts_computed_together_register_one_copy():
    bm = BlockManager(num_blocks=8, block_size=16)
    tokens = list(range(32))
    a, b = make_request(tokens, "a"), make_request(tokens, "b")
    for request in (a, b):  # both admitted before either has committed anything
        bm.allocate(request, 32)
    for request in (a, b):
        request.num_computed_tokens = 32
        bm.commit_full_blocks(request)
    assert a.block_ids == [0, 1] and b.block_ids == [2, 3]
    assert bm.num_cached_blocks == 2
    bm.free(a)
    bm.free(b)
    assert bm.find_cached_blocks(make_request([*tokens, 5], "c")) == [0, 1]
    bm.check_integrity()


# ---- eviction --------------------------------------------------------------------------


def make_lru_scene() -> tuple[BlockManager, Request, Request]:
    """Pool of 6 blocks of 4 tokens. A (8 tokens: blocks 0, 1 cached) is freed before
    B (10 tokens: blocks 2, 3 cached, block 4 partial); block 5 is never used."""
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = make_request(8, "a"), make_request(10, "b")
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.free(b)
    return bm, a, b


def test_eviction_order_unhashed_then_least_recently_freed_tail_first():
    bm, _, _ = make_lru_scene()
    assert free_queue(bm) == [4, 5, 1, 0, 3, 2]
    big = make_request(24, "big")
    bm.allocate(big, 24)
    assert big.block_ids == [4, 5, 1, 0, 3, 2]
    assert bm.num_cached_blocks == 0  # every reused block forgot its hash
    bm.check_integrity()


def test_eviction_drops_the_tail_of_a_prefix_before_its_head():
    bm, a, b = make_lru_scene()
    taker = make_request(12, "taker")
    bm.allocate(taker, 12)  # takes 4, 5 and A's tail block 1
    assert taker.block_ids == [4, 5, 1]
    assert bm.num_cached_blocks == 3
    assert bm.find_cached_blocks(make_request([*a.prompt_token_ids, 1], "a2")) == [0]
    assert bm.find_cached_blocks(make_request([*b.prompt_token_ids[:8], 1], "b2")) == [2, 3]


def test_a_cache_hit_makes_blocks_recently_used_again():
    bm, a, _ = make_lru_scene()
    again = make_request([*a.prompt_token_ids, 1], "a-again")
    assert admit(bm, again) == [0, 1]
    assert again.block_ids == [0, 1, 4]
    bm.free(again)
    # A's blocks were used after B's, so B's go first now; the partial block 4 leads.
    assert free_queue(bm) == [4, 5, 3, 2, 1, 0]


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=16)
    held, done = make_request(40, "held"), make_request(33, "done")
    admit(bm, held)
    admit(bm, done)
    bm.free(done)
    assert bm.num_cached_blocks == 4
    assert bm.reset_prefix_cache() == 2
    assert bm.num_cached_blocks == 2
    assert bm.find_cached_blocks(make_request(done.prompt_token_ids, "done2")) == []
    assert bm.find_cached_blocks(make_request(held.prompt_token_ids, "held2")) == [0, 1]
    assert bm.reset_prefix_cache() == 0
    bm.check_integrity()


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=8, block_size=16, enable_prefix_caching=False)
    tokens = list(range(40))
    admit(bm, make_request(tokens, "a"))
    assert bm.num_cached_blocks == 0
    assert bm.find_cached_blocks(make_request(tokens, "b")) == []


# ---- integrity -------------------------------------------------------------------------


def test_check_integrity_detects_a_referenced_block_in_the_free_queue():
    bm = BlockManager(num_blocks=4, block_size=16)
    request = make_request(20)
    admit(bm, request)
    bm.check_integrity()
    bm.blocks[1].ref_count = 0  # lost reference: neither held nor free
    with pytest.raises(AssertionError, match="block 1"):
        bm.check_integrity()


def test_check_integrity_detects_a_stale_cache_entry():
    bm = BlockManager(num_blocks=4, block_size=16)
    admit(bm, make_request(20))
    bm.blocks[0].block_hash = None  # the cache still points at block 0
    with pytest.raises(AssertionError, match="stale"):
        bm.check_integrity()


def test_check_integrity_detects_a_negative_ref_count():
    bm = BlockManager(num_blocks=4, block_size=16)
    request = make_request(20)
    admit(bm, request)
    bm.free(request)
    bm.blocks[2].ref_count = -1
    with pytest.raises(AssertionError, match="block 2"):
        bm.check_integrity()


# ---- KV events -----------------------------------------------------------------------------


def test_events_log_stored_and_removed_hashes_and_evicted_blocks():
    from pdserve.kv.block_hash import hash_block_chain
    from pdserve.kv.events import BlocksRemoved, BlocksStored

    bm = BlockManager(num_blocks=4, block_size=16, record_events=True)
    first = make_request(40, "a")  # two full blocks, one partial
    admit(bm, first)
    hashes = hash_block_chain(first.token_ids(0, 40), 16)
    assert bm.events.drain() == [BlocksStored(hashes)]
    assert sorted(bm.cached_hashes()) == sorted(hashes)
    bm.free(first)  # cached blocks stay: no removal yet
    assert bm.events.drain() == []
    second = make_request(64, "b")  # needs all 4 blocks: both cached ones are reused
    bm.allocate(second, 64)
    evicted = bm.drain_evicted()
    # Tail-first eviction order: the partial block (no hash) goes first, then the end of
    # the prefix before its beginning.
    assert [e.block_hash for e in evicted] == [hashes[1], hashes[0]]
    assert [e.block_id for e in evicted] == [1, 0]
    assert evicted[0].token_ids == tuple(first.token_ids(16, 32))
    assert bm.events.drain() == [BlocksRemoved([hashes[1], hashes[0]])]
    assert bm.drain_evicted() == []


def test_no_events_unless_asked():
    bm = BlockManager(num_blocks=4, block_size=16)
    admit(bm, make_request(40, "a"))
    assert bm.events is None
    assert bm.evicted == []
