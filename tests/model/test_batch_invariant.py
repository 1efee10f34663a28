"""Batch-invariant mode: a row's logits are bitwise the same whatever batch it runs in.

The product kernel alone (rows alone vs in batches of 2..33 at every position, 1 and 2
threads), then the whole engine: each request's logits at every step equal, bit for bit,
those of the request run alone, when 33 requests share steps (decode batches shrink through
every size from 33 to 1), under chunked and unchunked prefill, with 1 and 2 threads, and
when prompt + generated tokens are prefilled again (the recompute a migrated or preempted
request goes through) instead of decoded. Greedy outputs still equal transformers'.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.config import EngineConfig
from pdserve.errors import ConfigError
from pdserve.model.kernels import invariant
from tests.helpers import make_hf_model_dir, torch_threads

pytestmark = pytest.mark.skipif(not invariant.is_available(), reason="no C compiler here")

VOCAB = 512


@pytest.fixture(autouse=True)
def restore_threads():
    with torch_threads(torch.get_num_threads()):
        yield


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (37, 19), (200, 130)])
def test_product_rows_do_not_depend_on_the_batch(num_threads, out_features, in_features):
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    linear = invariant.PackedLinear.prepare(weight)
    x = torch.randn(40, in_features, generator=gen)
    torch.set_num_threads(num_threads)
    alone = [linear(x[i : i + 1], bias) for i in range(len(x))]
    for size in range(2, 34):
        for start in range(0, len(x) - size + 1, 3):
            batch = linear(x[start : start + size], bias)
            for i in range(size):
                assert torch.equal(batch[i : i + 1], alone[start + i]), (size, start, i)
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(torch.cat(alone).double(), expected, rtol=1e-5, atol=1e-5)


def test_avx2_build_is_batch_invariant_too(monkeypatch):
    """The tiles an AVX2-only CPU gets (3 rows, not 6), built here with AVX-512 turned off:
    rows still do not depend on the batch, and (one FMA chain per element either way) the
    results equal the AVX-512 build's."""
    lib = invariant.build(("-mno-avx512f",))
    if lib is None:
        pytest.skip("the AVX2 variant does not build here")
    gen = torch.Generator().manual_seed(3)
    weight, x = torch.randn(100, 70, generator=gen), torch.randn(13, 70, generator=gen)
    native = invariant.PackedLinear.prepare(weight)(x)
    monkeypatch.setattr(invariant, "_library", lambda: lib)
    linear = invariant.PackedLinear.prepare(weight)
    torch.set_num_threads(2)
    batch = linear(x)
    assert all(torch.equal(linear(x[i : i + 1]), batch[i : i + 1]) for i in range(13))
    assert all(torch.equal(linear(x[i : i + 5]), batch[i : i + 5]) for i in range(8))
    assert torch.equal(batch, native)


def test_product_is_the_same_on_one_thread_and_two():
    gen = torch.Generator().manual_seed(0)
    linear = invariant.PackedLinear.prepare(torch.randn(300, 64, generator=gen))
    x = torch.randn(17, 64, generator=gen)
    torch.set_num_threads(1)
    one = linear(x)
    torch.set_num_threads(2)
    assert torch.equal(linear(x), one)


def test_product_from_several_python_threads_at_once():
    """The C pool serves one call at a time; concurrent callers queue and all get their own
    right answers (ctypes releases the GIL, so the calls really overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(1)
    linear = invariant.PackedLinear.prepare(torch.randn(500, 48, generator=gen))
    inputs = [torch.randn(1 + i % 7, 48, generator=gen) for i in range(60)]
    torch.set_num_threads(2)
    expected = [linear(x) for x in inputs]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(linear, inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_product_in_a_forked_child_after_the_pool_started():
    """Pool threads do not survive fork(): a product in the child must not wait for the
    parent's (with fixed per-thread parts it would wait forever)."""
    import os

    gen = torch.Generator().manual_seed(4)
    linear = invariant.PackedLinear.prepare(torch.randn(400, 32, generator=gen))
    x = torch.randn(9, 32, generator=gen)
    torch.set_num_threads(2)
    expected = linear(x)  # the parent's pool now has a worker
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 iff the product is right
        os._exit(0 if torch.equal(linear(x), expected) else 1)
    for _ in range(600):  # up to 60 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the product hung in a forked child")


# ---- the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("bi"), "llama_gqa_llama3")


def make_prompts(num: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 90))] for _ in range(num)]


def make_llm(model_dir, **engine) -> LLM:
    engine.setdefault("num_kv_blocks", 512)
    return LLM(model_dir, skip_tokenizer_init=True, batch_invariant=True, **engine)


def record_logits(llm: LLM) -> dict[tuple[int, int], torch.Tensor]:
    """Logits of every sampled row, keyed by (request seed, index of the sampled token)."""
    runner = llm.engine.core.runner
    sample = runner.sampler
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def recording_sampler(logits, rows):
        for i, row in enumerate(rows):
            seen[(row.params.seed, row.num_output_tokens)] = logits[i].clone()
        return sample(logits, rows)

    runner.sampler = recording_sampler
    return seen


def run(llm: LLM, prompts, max_tokens: list[int], seeds: list[int], temperature=0.0):
    inputs = [{"prompt_token_ids": p} for p in prompts]
    params = [
        SamplingParams(max_tokens=n, seed=s, temperature=temperature, ignore_eos=True)
        for n, s in zip(max_tokens, seeds, strict=True)
    ]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(model_dir):
    """Each of 33 requests run by itself, one thread: outputs and logits per step."""
    prompts = make_prompts(33)
    max_tokens = [1 + i for i in range(33)]  # decode batches shrink through every size
    with torch_threads(1):
        llm = make_llm(model_dir, num_threads=1)
        logits = record_logits(llm)
        outputs = [
            run(llm, [p], [n], [i], temperature=1.0)[0]
            for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True))
        ]
    return prompts, max_tokens, outputs, logits


def assert_same_logits(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, row in expected.items():
        assert torch.equal(got[key], row), f"request {key[0]}, token {key[1]}"


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(
    "engine",
    [
        {"max_num_batched_tokens": 37},  # prompts split into chunks, mixed with decodes
        {"enable_chunked_prefill": False, "max_num_batched_tokens": 512},
        {"max_num_seqs": 5, "max_num_batched_tokens": 64, "enable_prefix_caching": False},
    ],
    ids=["chunked37", "unchunked", "five-at-a-time"],
)
def test_logits_equal_the_request_run_alone(model_dir, alone, engine, num_threads):
    prompts, max_tokens, outputs, logits = alone
    with torch_threads(num_threads):
        llm = make_llm(model_dir, num_threads=num_threads, **engine)
        got = record_logits(llm)
        batched = run(llm, prompts, max_tokens, list(range(len(prompts))), temperature=1.0)
    assert batched == outputs  # seeded sampling: exact because the logits are
    assert_same_logits(got, logits)


def test_recompute_of_prompt_and_outputs_equals_the_decode_step(model_dir, alone):
    """The next token's logits from a prefill of prompt + generated tokens (as after a
    migration or a preemption) equal the decode step's, with and without a cache hit."""
    prompts, _, outputs, logits = alone
    with torch_threads(1):
        llm = make_llm(model_dir, num_threads=1, max_num_batched_tokens=48)
        got = record_logits(llm)
        cases = [(i, k) for i in (3, 20, 32) for k in (1, len(outputs[i]) // 2)]
        for _ in range(2):  # cold, then the prompt blocks come from the prefix cache
            for i, k in cases:
                got.clear()
                run(llm, [prompts[i] + outputs[i][:k]], [1], [i])
                assert torch.equal(got[(i, 0)], logits[(i, k)]), (i, k)


def test_refused_where_it_is_not_implemented():
    with pytest.raises(ConfigError, match="batch_invariant"):
        EngineConfig(batch_invariant=True, device="cuda")
    with pytest.raises(ConfigError, match="batch_invariant"):
        EngineConfig(batch_invariant=True, dtype="bfloat16")


def test_refused_without_the_kernels(model_dir, monkeypatch):
    monkeypatch.setattr(invariant, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="batch_invariant"):
        make_llm(model_dir)


def test_builtin_model_greedy_equals_transformers(builtin_model_dir):
    """The built-in model's greedy output in this mode equals transformers' (the prompt of
    test_builtin.py, whose top-2 logits are far apart at every step, and a second one)."""
    import transformers

    from tests.helpers import hf_greedy

    tokenizer = transformers.AutoTokenizer.from_pretrained(builtin_model_dir)
    prompts = [tokenizer(t).input_ids for t in ("The quick brown fox", "def fibonacci(n):")]
    with torch_threads(2):
        llm = LLM(builtin_model_dir, batch_invariant=True, num_kv_blocks=64, num_threads=2)
        got = run(llm, prompts, [24, 24], [0, 1])
        expected = hf_greedy(builtin_model_dir, prompts, 24)
    assert got == expected
