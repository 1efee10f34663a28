"""The correctness oracle: greedy outputs equal Hugging Face transformers token for token.

Six tiny checkpoints written by transformers itself (Llama MHA; Llama GQA with llama3
RoPE scaling; Llama MQA with linear scaling; Qwen2 with q/k/v biases and tied embeddings;
Qwen3 with q/k norms; Llama with attention and MLP biases and a wide head_dim),
ten prompts of 1 to 333 tokens (one a duplicate, one sharing a long prefix with another),
16 new tokens each. The reference is `generate(do_sample=False)` one prompt at a time, no
padding. pdserve must match it under every scheduling regime: chunked prefill with a small
budget, no chunking, a cold then warm prefix cache, and a pool small enough to preempt.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from pdserve import LLM, SamplingParams
from tests.helpers import MODEL_KINDS, hf_greedy, make_hf_model_dir, torch_threads

KINDS = list(MODEL_KINDS)
LENGTHS = [1, 2, 15, 16, 17, 64, 100, 333]
NUM_NEW_TOKENS = 16
BLOCK_SIZE = 16
PARAMS = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def make_prompts(vocab_size: int = 512) -> list[list[int]]:
    rng = random.Random(1234)
    prompts = [[rng.randrange(vocab_size) for _ in range(n)] for n in LENGTHS]
    prompts.append(list(prompts[5]))  # a duplicate: identical blocks in one batch
    prompts.append(prompts[7][:200] + [rng.randrange(vocab_size) for _ in range(40)])
    return prompts


class Case:
    def __init__(self, kind, model_dir, prompts, reference):
        self.kind = kind
        self.model_dir = model_dir
        self.prompts = prompts
        self.reference = reference


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory) -> Case:
    kind = request.param
    model_dir = make_hf_model_dir(tmp_path_factory.mktemp(kind), kind)
    prompts = make_prompts()
    return Case(kind, model_dir, prompts, hf_greedy(model_dir, prompts, NUM_NEW_TOKENS))


def make_llm(model_dir, **engine) -> LLM:
    engine.setdefault("num_kv_blocks", 256)
    return LLM(model_dir, skip_tokenizer_init=True, **engine)


def generate(llm: LLM, prompts: list[list[int]]):
    inputs = [{"prompt_token_ids": p} for p in prompts]
    return llm.generate(inputs, PARAMS, use_tqdm=False)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_pool_clean(llm: LLM) -> None:
    bm = llm.engine.core.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity()


def count_preemptions(llm: LLM, monkeypatch) -> list[str]:
    """Record the id of every request the scheduler preempts."""
    scheduler = llm.engine.core.scheduler
    real_preempt = scheduler._preempt
    preempted: list[str] = []

    def preempt(request):
        preempted.append(request.request_id)
        real_preempt(request)

    monkeypatch.setattr(scheduler, "_preempt", preempt)
    return preempted


def test_reference_is_not_degenerate(case):
    # A reference that repeats one token would hide position and cache bugs.
    assert all(len(ids) == NUM_NEW_TOKENS for ids in case.reference)
    assert min(len(set(ids)) for ids in case.reference) >= 5
    assert len({tuple(ids) for ids in case.reference}) == len(case.prompts) - 1  # but the dup


def test_chunked_prefill_with_a_small_budget(case, monkeypatch):
    llm = make_llm(case.model_dir, max_num_batched_tokens=64)
    budgets = []
    scheduler = llm.engine.core.scheduler
    real_schedule = scheduler.schedule

    def schedule():
        output = real_schedule()
        budgets.append(output.num_batched_tokens)
        return output

    monkeypatch.setattr(scheduler, "schedule", schedule)
    assert token_ids(generate(llm, case.prompts)) == case.reference
    assert max(budgets) == 64  # the budget was binding: long prompts took several chunks
    assert_pool_clean(llm)


def test_without_chunked_prefill(case):
    llm = make_llm(
        case.model_dir,
        enable_chunked_prefill=False,
        max_model_len=400,
        max_num_batched_tokens=400,
        max_num_seqs=4,
    )
    assert token_ids(generate(llm, case.prompts)) == case.reference
    assert_pool_clean(llm)


@pytest.mark.parametrize(
    ("block_size", "budget"),
    [(16, 32), (8, 7), (32, 64)],
    ids=["block16-budget32", "block8-budget7", "block32-budget64"],
)
def test_cold_then_warm_prefix_cache(case, block_size, budget):
    llm = make_llm(case.model_dir, block_size=block_size, max_num_batched_tokens=budget)
    cold = generate(llm, case.prompts)
    assert token_ids(cold) == case.reference
    # FCFS with running-first: prompts 5 and 7 finish their prefill before 8 and 9 are
    # admitted, so the duplicate and the shared 200-token prefix hit within the cold run.
    assert cold[8].num_cached_tokens == 63 // block_size * block_size
    assert cold[9].num_cached_tokens == 200 // block_size * block_size
    assert_pool_clean(llm)
    warm = generate(llm, case.prompts)
    assert token_ids(warm) == case.reference
    expected = [(len(p) - 1) // block_size * block_size for p in case.prompts]
    assert [o.num_cached_tokens for o in warm] == expected
    assert_pool_clean(llm)


def test_batch_invariant_mode(case):
    """The batch-invariant kernels (one fixed summation order per output element) round
    differently from the default ones, but not enough to change a greedy token."""
    llm = make_llm(case.model_dir, batch_invariant=True, max_num_batched_tokens=64)
    assert token_ids(generate(llm, case.prompts)) == case.reference
    assert_pool_clean(llm)


def test_one_request_at_a_time_up_to_the_context_length(case):
    longest = max(len(p) for p in case.prompts) + NUM_NEW_TOKENS
    llm = make_llm(
        case.model_dir, max_num_seqs=1, max_num_batched_tokens=100, max_model_len=longest
    )
    assert token_ids(generate(llm, case.prompts)) == case.reference
    assert_pool_clean(llm)


def test_preemption_under_a_small_pool(case, monkeypatch):
    largest = max(len(p) for p in case.prompts) + NUM_NEW_TOKENS
    num_blocks = -(-largest // BLOCK_SIZE) + 2
    llm = make_llm(case.model_dir, num_kv_blocks=num_blocks, max_num_batched_tokens=64)
    preempted = count_preemptions(llm, monkeypatch)
    assert token_ids(generate(llm, case.prompts)) == case.reference
    assert preempted, "the pool was meant to be small enough to force preemption"
    assert_pool_clean(llm)


def test_preemption_without_prefix_caching(case, monkeypatch):
    largest = max(len(p) for p in case.prompts) + NUM_NEW_TOKENS
    num_blocks = -(-largest // BLOCK_SIZE) + 2
    llm = make_llm(
        case.model_dir,
        num_kv_blocks=num_blocks,
        max_num_batched_tokens=96,
        enable_prefix_caching=False,
    )
    preempted = count_preemptions(llm, monkeypatch)
    assert token_ids(generate(llm, case.prompts)) == case.reference
    assert preempted
    assert_pool_clean(llm)


def test_rope_scaling_matters_to_the_oracle(case, tmp_path):
    """The comparison can fail: dropping the checkpoint's RoPE scaling changes the output.
    (Only the checkpoints with scaling say anything here; the others pass trivially.)"""
    if case.kind not in ("llama_gqa_llama3", "llama_linear"):
        return
    unscaled = tmp_path / "unscaled"
    shutil.copytree(case.model_dir, unscaled)
    config = json.loads((unscaled / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (unscaled / "config.json").write_text(json.dumps(config))
    llm = make_llm(unscaled)
    assert token_ids(generate(llm, case.prompts)) != case.reference


def test_seeded_sampling_is_the_same_under_every_regime(case, monkeypatch):
    """Not HF's business but the same invariant: scheduling never changes seeded tokens."""
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=12, ignore_eos=True)
        for i in range(len(case.prompts))
    ]
    inputs = [{"prompt_token_ids": p} for p in case.prompts]
    largest = max(len(p) for p in case.prompts) + 12
    regimes = [
        {"max_num_batched_tokens": 2048},
        {"max_num_batched_tokens": 48},
        {"enable_chunked_prefill": False, "max_model_len": 400, "max_num_batched_tokens": 400},
        {"num_kv_blocks": -(-largest // BLOCK_SIZE) + 1, "max_num_batched_tokens": 64},
    ]
    results = []
    for engine in regimes:
        llm = make_llm(case.model_dir, **engine)
        preempted = count_preemptions(llm, monkeypatch)
        for _ in range(2):  # the second run hits the prefix cache
            outputs = llm.generate(inputs, params, use_tqdm=False)
            results.append(token_ids(outputs))
        assert bool(preempted) == ("num_kv_blocks" in engine)
        assert_pool_clean(llm)
    assert all(r == results[0] for r in results)
    assert results[0] != [ref[:12] for ref in case.reference]  # really sampled, not greedy


def test_last_layer_computes_only_the_sampled_rows(case, monkeypatch):
    """Past its keys and values, the last layer (attention, output projection, MLP) runs on
    the rows whose next token is sampled and no others: a prompt chunk that does not end its prompt contributes no row there,
    a finished prompt one, a decode one. Every earlier layer runs on every row. Outputs
    still equal transformers'."""
    llm = make_llm(case.model_dir, max_num_batched_tokens=64)
    runner = llm.engine.core.runner
    layers = runner.model.layers
    rows: dict[str, list[int]] = {"first": [], "last": [], "last_attention": []}
    layers[0].mlp.register_forward_hook(lambda m, args, out: rows["first"].append(len(out)))
    layers[-1].mlp.register_forward_hook(lambda m, args, out: rows["last"].append(len(out)))
    layers[-1].self_attn.o_proj.register_forward_hook(
        lambda m, args, out: rows["last_attention"].append(len(args[0]))
    )
    steps: list[tuple[int, int]] = []  # (tokens scheduled, requests sampled) per step
    real_execute = runner.execute

    def execute(output, *args, **kwargs):
        steps.append((output.num_batched_tokens, sum(s.is_sampling for s in output.scheduled)))
        return real_execute(output, *args, **kwargs)

    monkeypatch.setattr(runner, "execute", execute)
    assert token_ids(generate(llm, case.prompts)) == case.reference
    # A prompt nothing is cached for, alone: how its chunks go through is known exactly.
    # (Its greedy continuation must not start with EOS, which the reference's
    # `min_new_tokens` blocks and `ignore_eos` does not.)
    lone = [(token * 7 + 5) % 512 for token in case.prompts[LENGTHS.index(333)]]
    assert token_ids(generate(llm, [lone])) == hf_greedy(case.model_dir, [lone], NUM_NEW_TOKENS)
    assert rows["first"] == [tokens for tokens, _ in steps]
    assert rows["last"] == rows["last_attention"] == [sampled for _, sampled in steps]
    # The lone 333-token prompt: five 64-token chunks that sample nothing, then its last
    # 13 tokens sample the first token, then one row per decode step.
    assert steps[-NUM_NEW_TOKENS - 5 :] == [(64, 0)] * 5 + [(13, 1)] + [(1, 1)] * 15
    assert rows["last"][-NUM_NEW_TOKENS - 5 :] == [0] * 5 + [1] * 16


def test_a_model_that_returns_every_row_still_samples_the_right_ones(case, monkeypatch):
    """Without output rows the last layer runs on every row (as a model that does not prune
    would): the runner then picks the sampled rows itself, and outputs do not change."""
    llm = make_llm(case.model_dir, max_num_batched_tokens=64)
    runner = llm.engine.core.runner
    monkeypatch.setattr(runner, "_prepare_output_rows", lambda *args: None)
    rows: dict[str, list[int]] = {"first": [], "last": []}
    for name, layer in (("first", runner.model.layers[0]), ("last", runner.model.layers[-1])):
        layer.mlp.register_forward_hook(lambda m, args, out, n=name: rows[n].append(len(out)))
    assert token_ids(generate(llm, case.prompts)) == case.reference
    assert rows["last"] == rows["first"]  # every row, every step
