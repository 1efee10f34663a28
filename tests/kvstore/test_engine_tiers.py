"""The engine with KV tiers: a prefix evicted from the device pool comes back from host
RAM, disk or Redis — token-exact against an engine without any cache, with the exact
number of cached tokens — and a disk tier serves a prompt again after a restart."""

from __future__ import annotations

import itertools

import pytest

from pdserve.engine.core import EngineCore
from pdserve.kv.events import BlocksStored
from pdserve.sampling_params import SamplingParams
from tests.helpers import make_engine_core, make_hf_model_dir, torch_threads

BLOCK_SIZE = 16
NUM_BLOCKS = 16  # 256 tokens: the long prompt below evicts every other cached block
PROMPT = [(7 * i + 3) % 500 + 1 for i in range(100)]  # 6 full blocks + 4 tokens
LONG = [(11 * i + 5) % 500 + 1 for i in range(240)]  # with 4 outputs: all 16 blocks
NUM_PREFIX_TOKENS = 96  # whole blocks, one token left to compute
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("tiers"), "llama_gqa_llama3")


def make_core(model_dir, **tiers) -> EngineCore:
    return make_engine_core(
        model_dir, block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS, max_model_len=256, **tiers
    )


def run(core: EngineCore, prompt: list[int]) -> tuple[list[int], int]:
    """Greedy tokens of `prompt` and how many of its tokens came from a cache."""
    request_id = f"r{next(_ids)}"
    core.add_request(request_id, prompt, GREEDY)
    tokens: list[int] = []
    num_cached = None
    while core.has_unfinished_requests():
        for output in core.step():
            tokens += output.new_token_ids
            num_cached = output.num_cached_tokens
    assert core.block_manager.num_free_blocks == NUM_BLOCKS  # no leaks
    return tokens, num_cached


@pytest.fixture(scope="module")
def reference(model_dir) -> list[int]:
    core = make_core(model_dir, enable_prefix_caching=False)
    tokens, num_cached = run(core, PROMPT)
    assert num_cached == 0
    return tokens


def evict_and_rerun(core: EngineCore) -> tuple[list[int], int]:
    assert run(core, PROMPT)[1] == 0
    run(core, LONG)  # pushes PROMPT's blocks out of the device pool into the tiers
    assert core.block_manager.find_cached_blocks(_probe(core)) == []
    assert core.kv_tiers.store.flush(10)
    return run(core, PROMPT)


def _probe(core: EngineCore):
    return core.make_request("probe", PROMPT, GREEDY)


def test_hit_from_host_ram(model_dir, reference):
    core = make_core(model_dir, kv_host_cache_gib=0.01)
    prompt_hashes = _probe(core).update_block_hashes(BLOCK_SIZE)
    assert evict_and_rerun(core) == (reference, NUM_PREFIX_TOKENS)
    stats = core.kv_tiers.store.stats()
    assert stats.tiers["host"].num_hit_blocks == 6
    host_stored = [
        h
        for e in core.drain_kv_events()
        if isinstance(e, BlocksStored) and e.tier == "host"
        for h in e.block_hashes
    ]
    # LONG's blocks evict PROMPT's, last block first; PROMPT's rerun evicts some of LONG's.
    assert sorted(host_stored[:6]) == sorted(prompt_hashes)
    core.close(persist_kv=False)


def test_blocks_reused_by_a_reservation_are_saved_first(model_dir):
    core = make_core(model_dir, kv_host_cache_gib=0.01)
    run(core, PROMPT)
    prompt_hashes = _probe(core).update_block_hashes(BLOCK_SIZE)
    reserved = core.make_request("import", LONG, GREEDY)
    assert core.try_reserve(reserved)  # decode side: fresh blocks for a prefill's KV
    # 15 of the 16 blocks: 9 never used, PROMPT's partial block, then its cached blocks
    # from the chain's end: all but the first leave the device and must reach the host.
    host = core.kv_tiers.store.tier("host")
    assert [host.contains(h) for h in prompt_hashes] == [False] + [True] * 5
    assert core.block_manager.cached_hashes()[:1] == prompt_hashes[:1]
    core.abort_requests(["import"])
    core.close(persist_kv=False)


def test_hit_from_disk(model_dir, reference, tmp_path):
    core = make_core(model_dir, kv_disk_cache_dir=str(tmp_path))
    assert evict_and_rerun(core) == (reference, NUM_PREFIX_TOKENS)
    assert core.kv_tiers.store.stats().tiers["disk"].num_hit_blocks == 6
    core.close(persist_kv=False)


@pytest.mark.parametrize("secret", [None, b"cluster-secret"], ids=["unkeyed", "keyed"])
def test_hit_from_redis(model_dir, reference, redis_db, secret):
    core = make_core(model_dir, kv_redis_url=redis_db, kv_tier_secret=secret)
    assert evict_and_rerun(core) == (reference, NUM_PREFIX_TOKENS)
    assert core.kv_tiers.store.stats().tiers["redis"].num_hit_blocks == 6
    core.close(persist_kv=False)


def test_hit_from_int8_host_ram(model_dir):
    core = make_core(model_dir, kv_host_cache_gib=0.01, kv_tier_dtype="int8")
    tokens, num_cached = evict_and_rerun(core)
    assert num_cached == NUM_PREFIX_TOKENS and len(tokens) == 4
    assert all(b.is_int8 for b in core.kv_tiers.store.tiers[0].blocks())
    core.close(persist_kv=False)


def test_disk_tier_survives_an_engine_restart(model_dir, reference, tmp_path):
    first = make_core(model_dir, kv_disk_cache_dir=str(tmp_path))
    assert run(first, PROMPT) == (reference, 0)
    first.close()  # a clean shutdown writes the device's cached blocks to disk

    second = make_core(model_dir, kv_disk_cache_dir=str(tmp_path))
    events = second.drain_kv_events()
    assert isinstance(events[0], BlocksStored) and events[0].tier == "disk"
    assert run(second, PROMPT) == (reference, NUM_PREFIX_TOKENS)
    assert second.kv_tiers.store.stats().tiers["disk"].num_hit_blocks == 6
    second.close(persist_kv=False)


def test_tier_hit_blocks_join_the_device_prefix_cache(model_dir, reference):
    core = make_core(model_dir, kv_host_cache_gib=0.01)
    evict_and_rerun(core)
    # The loaded blocks are registered on the device: the next run hits them there.
    assert len(core.block_manager.find_cached_blocks(_probe(core))) == 6
    assert run(core, PROMPT) == (reference, NUM_PREFIX_TOKENS)
    assert core.kv_tiers.store.stats().tiers["host"].num_hit_blocks == 6
    core.close(persist_kv=False)


def test_frequency_admission_writes_a_prefix_at_its_second_sight(model_dir, reference, tmp_path):
    core = make_core(model_dir, kv_disk_cache_dir=str(tmp_path), kv_tier_admission="frequency")
    disk = core.kv_tiers.store.tier("disk")
    prompt_hashes = _probe(core).update_block_hashes(BLOCK_SIZE)[:6]
    assert run(core, PROMPT) == (reference, 0)
    assert core.kv_tiers.store.flush(10)
    assert disk.hashes() == []  # seen once: its 6 full blocks were refused
    # Seen again, served from the device pool: the now-hot blocks are copied down from it.
    assert run(core, PROMPT) == (reference, NUM_PREFIX_TOKENS)
    assert core.kv_tiers.store.flush(10)
    assert disk.hashes() == prompt_hashes
    run(core, LONG)  # a one-hit wonder: pushes PROMPT off the device, never reaches disk
    assert core.kv_tiers.store.flush(10)
    assert sorted(disk.hashes()) == sorted(prompt_hashes)
    assert run(core, PROMPT) == (reference, NUM_PREFIX_TOKENS)  # from disk
    stats = core.kv_tiers.store.stats()
    assert stats.admission == "frequency"
    disk_stats = stats.tiers["disk"]
    assert disk_stats.num_hit_blocks == 6
    assert disk_stats.num_admitted_blocks == 6
    assert disk_stats.written_bytes == sum(disk.path(h).stat().st_size for h in prompt_hashes)
    core.close(persist_kv=False)


def test_admit_all_writes_every_computed_block(model_dir, reference, tmp_path):
    core = make_core(model_dir, kv_disk_cache_dir=str(tmp_path))
    assert run(core, PROMPT) == (reference, 0)
    run(core, LONG)
    assert core.kv_tiers.store.flush(10)
    stats = core.kv_tiers.store.stats()
    assert stats.admission == "all"
    assert stats.tiers["disk"].num_rejected_blocks == 0
    # PROMPT's 6 full blocks and LONG's 15 (240 prompt + 4 outputs: 244 tokens).
    assert core.kv_tiers.store.tier("disk").num_blocks == 6 + 15
    core.close(persist_kv=False)
