"""The serving invariant: the same tokens whichever way a request is served.

Greedy (and seeded) outputs from the cluster equal the offline engine's, in every mode:
aggregated, disaggregated over shm, disaggregated over tcp, and auto (where short prompts
stay local and long ones go remote). Prompts are of mixed lengths, several longer than the
workers' 64-token chunk, so remote prefill streams KV over several steps. Afterwards every
worker's pool is entirely free.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from tests.serving.conftest import ENGINE

PROMPT_LENGTHS = [1, 5, 16, 17, 63, 64, 65, 150, 333]

MODES = {
    "aggregated": {"mode": "aggregated"},
    "disaggregated-shm": {"mode": "disaggregated", "kv_backend": "shm"},
    "disaggregated-tcp": {"mode": "disaggregated", "kv_backend": "tcp"},
    "auto": {"mode": "auto", "auto_local_prefill_tokens": 64},
}


@pytest.fixture(scope="module")
def prompts(cluster) -> list[list[int]]:
    text = Path(__file__).read_text(encoding="utf-8")
    ids = cluster.client.tokenizer.encode(text, add_special_tokens=False)
    return [ids[i * 7 : i * 7 + n] for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def offline(builtin_model_dir):
    return LLM(
        str(builtin_model_dir),
        max_num_batched_tokens=ENGINE.max_num_batched_tokens,
        num_kv_blocks=ENGINE.num_kv_blocks,
        num_threads=1,
        batch_invariant=ENGINE.batch_invariant,
    )


def offline_tokens(offline, prompts, params) -> list[list[list[int]]]:
    outputs = offline.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [[c.token_ids for c in out.outputs] for out in outputs]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10, n=2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded-n2"])
def test_tokens_equal_offline_engine(cluster, offline, prompts, mode, params):
    expected = offline_tokens(offline, prompts, params)
    cluster.set_routing(**MODES[mode])
    outputs = cluster.generate_many(prompts, params, prefix=f"{mode}-{params.n}")
    got = [[c.token_ids for c in out.outputs] for out in outputs]
    assert got == expected
    assert all(out.finished for out in outputs)
    stats = cluster.wait_idle()
    assert all(free == total for free, total in stats.values()), stats


# One block of the built-in model across its layers: 8 layers x (k, v) x 16 tokens x
# 4 kv heads x 64 dims x 4 bytes.
BLOCK_BYTES = 8 * 2 * 16 * 4 * 64 * 4


@pytest.mark.parametrize(
    ("mode", "num_tokens", "expected_blocks"),
    [
        ("aggregated", 333, 0),
        ("disaggregated-shm", 333, 21),  # cdiv(333, 16); chunks of 64 are block-aligned
        ("disaggregated-tcp", 333, 21),
        ("disaggregated-tcp", 5, 1),
        ("auto", 63, 0),  # below auto_local_prefill_tokens: prefilled on the decode worker
        ("auto", 150, 10),
    ],
)
def test_kv_moves_only_when_prefill_is_remote(cluster, prompts, mode, num_tokens, expected_blocks):
    cluster.set_routing(**MODES[mode])
    # A prompt no worker has seen: a prefix the decode worker had cached would shrink the
    # transfer (delta hand-over, see test_kv_routing.py).
    rng = random.Random(f"moves-{mode}-{num_tokens}")
    prompt = [rng.randrange(3, 32000) for _ in range(num_tokens)]
    transfers, nbytes = cluster.client.num_kv_transfers, cluster.client.num_kv_transfer_bytes
    cluster.generate(prompt, GREEDY, f"moves-{mode}-{num_tokens}")
    assert cluster.client.num_kv_transfers - transfers == (1 if expected_blocks else 0)
    assert cluster.client.num_kv_transfer_bytes - nbytes == expected_blocks * BLOCK_BYTES
