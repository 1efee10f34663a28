"""The frequency sketch: exact counts while nothing collides, never an under-estimate when
everything does, halving that ages counts, fixed memory."""

from __future__ import annotations

import random

from pdserve.kv.block_hash import hash_block_chain
from pdserve.kv.frequency import FrequencySketch


def chain(num_blocks: int, seed: int) -> list[int]:
    return hash_block_chain([seed * 1000 + i for i in range(num_blocks * 4)], 4)


def test_counts_are_exact_for_a_few_distinct_chains():
    sketch = FrequencySketch(width=4096, sample_size=10**9)
    hot, cold = chain(8, 1), chain(8, 2)
    for sight in range(1, 6):
        assert sketch.add(hot) == [sight] * 8
    assert sketch.add(cold) == [1] * 8
    assert sketch.estimate(hot) == [5] * 8
    assert sketch.estimate(cold) == [1] * 8
    assert sketch.estimate(chain(3, 3)) == [0, 0, 0]


def test_a_shared_head_counts_every_chain_through_it():
    sketch = FrequencySketch(width=4096, sample_size=10**9)
    head = hash_block_chain(list(range(8)), 4)  # 2 blocks
    tails = [hash_block_chain(list(range(8)) + [100 + t] * 4, 4) for t in range(3)]
    for hashes in tails:
        sketch.add(hashes)
    assert [h[:2] for h in tails] == [head] * 3
    assert sketch.estimate(head) == [3, 3]
    assert sketch.estimate([h[2] for h in tails]) == [1, 1, 1]


def test_never_below_the_true_count_when_everything_collides():
    sketch = FrequencySketch(width=64, sample_size=10**9)  # 64 columns, 2000 keys
    rng = random.Random(0)
    keys = [rng.getrandbits(64) for _ in range(2000)]
    true = dict.fromkeys(keys, 0)
    for _ in range(6000):
        key = keys[min(int(rng.paretovariate(1.0)) - 1, len(keys) - 1)]
        sketch.add([key])
        true[key] += 1
    estimates = sketch.estimate(keys)
    assert all(e >= t for e, t in zip(estimates, (true[k] for k in keys), strict=True))
    assert sketch._table.shape == (4, 64)  # memory fixed whatever the traffic


def test_halving_ages_counts():
    sketch = FrequencySketch(width=4096, sample_size=10**9)
    hashes = chain(4, 1)
    for _ in range(5):
        sketch.add(hashes)
    sketch.halve()
    assert sketch.estimate(hashes) == [2] * 4  # 5 // 2
    sketch.halve()
    sketch.halve()
    assert sketch.estimate(hashes) == [0] * 4
    assert sketch.num_resets == 3


def test_the_sample_size_triggers_halving():
    sketch = FrequencySketch(width=4096, sample_size=12)
    hashes = chain(4, 1)
    assert sketch.add(hashes) == [1] * 4  # 4 added
    assert sketch.add(hashes) == [2] * 4  # 8
    assert sketch.add(hashes) == [1] * 4  # 12: reset, 3 // 2 = 1, returned after it
    assert sketch.num_resets == 1
    assert sketch.add(hashes) == [2] * 4  # 6 + 4 = 10 < 12


def test_width_is_a_power_of_two():
    assert FrequencySketch(width=1000).width == 1024
    assert FrequencySketch(width=1024).width == 1024
    assert FrequencySketch(width=1).width == 64
