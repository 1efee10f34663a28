"""Disaggregated serving over tcp with the int8 wire (`kv_wire_dtype: int8`): one prefill
and one decode worker of the shared serving cluster hand KV over as int8.

What is robust on the built-in model (random weights: int8 KV flips some later greedy
tokens, see docs/benchmarks.md) and asserted here: every request finishes with
`max_tokens` tokens; the first token (sampled by the prefill worker on full-precision KV)
equals the offline engine's; the router counts exactly the int8 bytes of the prompts'
blocks (values plus float32 scales: 65792 bytes a block, 0.251x of float32); every pool is free afterwards.
How far the rest agrees with the unquantised offline run is printed (`pytest -s`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from tests.serving.conftest import ENGINE

PROMPT_LENGTHS = [5, 16, 40, 150, 333]  # chunks of 64 tokens are block-aligned
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# The built-in model's KV per block: 8 layers x (k, v) x 16 tokens x 4 kv heads x 64 dims.
INT8_BLOCK_BYTES = 8 * 2 * (16 * 4 * 64 + 4 * 4)  # int8 values + a float32 scale per head


@pytest.fixture(scope="module")
def prompts(cluster) -> list[list[int]]:
    text = Path(__file__).read_text(encoding="utf-8")
    ids = cluster.client.tokenizer.encode(text, add_special_tokens=False)
    return [ids[i * 5 : i * 5 + n] for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def expected(builtin_model_dir, prompts) -> list[list[int]]:
    offline = LLM(
        str(builtin_model_dir),
        max_num_batched_tokens=ENGINE.max_num_batched_tokens,
        num_kv_blocks=ENGINE.num_kv_blocks,
        num_threads=1,
        batch_invariant=ENGINE.batch_invariant,
    )
    outputs = offline.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [out.outputs[0].token_ids for out in outputs]


def test_int8_hand_over_serves_first_token_exactly_and_sends_int8_bytes(cluster, prompts, expected):
    cluster.set_routing(mode="disaggregated", kv_backend="tcp", kv_wire_dtype="int8")
    try:
        transfers, nbytes = cluster.client.num_kv_transfers, cluster.client.num_kv_transfer_bytes
        got = []
        for i, prompt in enumerate(prompts):  # one at a time: chunks stay block-aligned
            output, _ = cluster.generate(prompt, GREEDY, f"int8-{i}")
            assert output.finished
            got.append(output.outputs[0].token_ids)
        assert [len(t) for t in got] == [GREEDY.max_tokens] * len(prompts)
        assert [t[0] for t in got] == [t[0] for t in expected]
        num_blocks = sum(-(-n // 16) for n in PROMPT_LENGTHS)
        assert cluster.client.num_kv_transfers - transfers == len(prompts)
        assert cluster.client.num_kv_transfer_bytes - nbytes == num_blocks * INT8_BLOCK_BYTES
        stats = cluster.wait_idle()
        assert all(free == total for free, total in stats.values()), stats
    finally:
        cluster.set_routing()
    for want, have in zip(expected, got, strict=True):
        matched = next(
            (i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), len(want)
        )
        print(f"int8 wire: {matched}/{len(want)} greedy tokens equal the unquantised run")
