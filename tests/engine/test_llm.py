"""The offline `LLM` API on a tiny Llama carrying the built-in tokenizer: parameter lists,
output order, text prompts, n > 1, seeds, stop rules end to end, request validation, and
no leaked blocks or requests after errors."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.errors import InvalidRequestError, RequestFailedError
from tests.helpers import make_hf_model_dir, torch_threads

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["Hello world", "The quick brown fox jumps", "def f(x):\n    return"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, builtin_model_dir):
    return make_hf_model_dir(
        tmp_path_factory.mktemp("llm"),
        "llama_mha",
        vocab_size=32000,
        max_position_embeddings=256,
        tokenizer_from=builtin_model_dir,
    )


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    # Batch-invariant: tests compare a prompt's tokens alone and in batches.
    return LLM(model_dir, num_kv_blocks=32, max_model_len=128, batch_invariant=True)


def generate(llm: LLM, prompts, params=GREEDY, **kwargs):
    return llm.generate(prompts, params, use_tqdm=False, **kwargs)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_leaks(llm: LLM) -> None:
    engine = llm.engine
    bm = engine.core.block_manager
    assert not engine.has_unfinished_requests()
    assert engine.core.requests == {}
    assert engine.processor.states == {}
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity()


@pytest.fixture(scope="module")
def reference(llm) -> list[list[int]]:
    """Greedy continuations of PROMPTS, generated one prompt at a time."""
    return [token_ids(generate(llm, prompt))[0] for prompt in PROMPTS]


# ---- shapes of the call ------------------------------------------------------------------


def test_one_params_for_all_equals_a_list_and_batching_changes_nothing(llm, reference):
    assert token_ids(generate(llm, PROMPTS)) == reference
    assert token_ids(generate(llm, PROMPTS, [GREEDY] * 3)) == reference
    assert all(len(ids) == 8 for ids in reference)
    assert_no_leaks(llm)


def test_outputs_follow_input_order_not_finish_order(llm, reference):
    max_tokens = [8, 4, 1]  # the last prompt finishes first
    params = [GREEDY.replace(max_tokens=n) for n in max_tokens]
    outputs = generate(llm, PROMPTS, params)
    assert [o.prompt for o in outputs] == PROMPTS
    assert token_ids(outputs) == [ref[:n] for ref, n in zip(reference, max_tokens, strict=True)]
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * 3
    assert all(o.finished for o in outputs)


def test_string_prompt_is_tokenised_and_output_detokenised(llm):
    tokenizer = llm.get_tokenizer()
    (output,) = generate(llm, "Hello world")  # a bare string is one prompt
    assert output.prompt == "Hello world"
    assert output.prompt_token_ids == tokenizer.encode("Hello world")
    completion = output.outputs[0]
    prompt_text = tokenizer.decode(output.prompt_token_ids)
    full_text = tokenizer.decode(output.prompt_token_ids + completion.token_ids)
    assert completion.text == full_text[len(prompt_text) :]
    assert completion.text


def test_token_id_prompts_equal_string_prompts(llm):
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    by_ids = generate(llm, [{"prompt_token_ids": ids}])
    by_text = generate(llm, [PROMPTS[1]])
    assert token_ids(by_ids) == token_ids(by_text)
    assert by_ids[0].prompt is None


def test_n_samples(llm, reference):
    greedy = generate(llm, PROMPTS[:1], GREEDY.replace(n=2))[0]
    assert [o.index for o in greedy.outputs] == [0, 1]
    assert [o.token_ids for o in greedy.outputs] == [reference[0]] * 2
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    sampled = generate(llm, PROMPTS[:1], params)[0]
    samples = [o.token_ids for o in sampled.outputs]
    assert len({tuple(s) for s in samples}) == 3
    assert all(len(s) == 8 for s in samples)
    assert_no_leaks(llm)


def test_seeded_sampling_is_independent_of_batch_and_repeatable(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=5, max_tokens=8, ignore_eos=True)
    alone = token_ids(generate(llm, PROMPTS[2], params))[0]
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batched = generate(llm, PROMPTS, [others, others, params])
    assert token_ids(batched)[2] == alone
    assert token_ids(generate(llm, PROMPTS[2], params))[0] == alone
    assert token_ids(generate(llm, PROMPTS[2], params.replace(seed=6)))[0] != alone


# ---- stop rules end to end ---------------------------------------------------------------


def test_stop_string_trims_text_and_frees_the_request(llm):
    (full,) = generate(llm, PROMPTS[0])
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    (stopped,) = generate(llm, PROMPTS[0], GREEDY.replace(stop=[stop]))
    completion = stopped.outputs[0]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert completion.text == text[: text.index(stop)]
    assert len(completion.token_ids) < len(full.outputs[0].token_ids)
    assert_no_leaks(llm)


def test_stop_token_id_and_min_tokens(llm, reference):
    ref = reference[1]
    stop_id = ref[2]
    (stopped,) = generate(llm, PROMPTS[1], GREEDY.replace(stop_token_ids=[stop_id]))
    completion = stopped.outputs[0]
    first = ref.index(stop_id)
    assert completion.token_ids == ref[: first + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_id)
    # min_tokens masks the stop id for the first 4 tokens: the greedy path must avoid it.
    params = GREEDY.replace(stop_token_ids=[stop_id], min_tokens=4)
    (delayed,) = generate(llm, PROMPTS[1], params)
    ids = delayed.outputs[0].token_ids
    assert stop_id not in ids[:4]
    assert len(ids) >= 4
    assert ids[:first] == ref[:first]
    assert_no_leaks(llm)


def test_logprobs_end_to_end(llm, reference):
    (output,) = generate(llm, PROMPTS[0], GREEDY.replace(logprobs=2))
    completion = output.outputs[0]
    assert completion.token_ids == reference[0]
    assert len(completion.logprobs) == 8
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert entry[token_id].rank == 1  # greedy
        assert len(entry) == 2
    total = sum(
        e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True)
    )
    assert completion.cumulative_logprob == pytest.approx(total)


def test_max_tokens_none_runs_to_the_context_length(model_dir):
    llm = LLM(model_dir, num_kv_blocks=8, max_model_len=40, skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    (output,) = generate(llm, {"prompt_token_ids": list(range(100, 130))}, params)
    assert len(output.outputs[0].token_ids) == 10
    assert output.outputs[0].finish_reason == "length"
    assert_no_leaks(llm)


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        # Non-integers must be refused too. Unchecked, n=1.5 raised a TypeError in the output
        # processor, logprobs=1.5 a TypeError inside the engine step (failing every request
        # in the batch), and max_tokens=2.5 generated 3 tokens.
        ({"n": 1.5}, "n"),
        ({"logprobs": 1.5}, "logprobs"),
        ({"max_tokens": 2.5}, "max_tokens"),
    ],
    ids=lambda value: (
        ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None
    ),
)
def test_bad_sampling_params_name_the_parameter(params, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**params)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ({"prompt_token_ids": []}, GREEDY, "prompt"),
        ({"prompt_token_ids": [5, 32000]}, GREEDY, "prompt"),
        ({"prompt_token_ids": [5, -1]}, GREEDY, "prompt"),
        ({"prompt_token_ids": [5, "x"]}, GREEDY, "prompt"),
        ({"prompt_token_ids": list(range(128))}, GREEDY, "prompt"),
        ({"prompt_token_ids": list(range(121))}, GREEDY, "max_tokens"),
        ({"text": "no ids"}, GREEDY, "prompt"),
        # A stop id outside the vocabulary must be refused up front: with min_tokens the
        # sampler masks it by indexing the logits, and the IndexError took the batch down.
        (
            {"prompt_token_ids": [5, 6]},
            GREEDY.replace(stop_token_ids=[32000], min_tokens=2),
            "stop_token_ids",
        ),
    ],
    ids=[
        "empty",
        "id>=vocab",
        "negative id",
        "not an int",
        "too long",
        "no room",
        "bad dict",
        "stop id>=vocab",
    ],
)
def test_bad_requests_raise_and_leak_nothing(llm, reference, prompt, params, param):
    with pytest.raises(InvalidRequestError) as info:
        generate(llm, [PROMPTS[0], prompt], params)  # the valid first one is withdrawn
    assert info.value.param == param
    assert_no_leaks(llm)
    assert token_ids(generate(llm, PROMPTS[:1])) == reference[:1]


def test_prompt_needing_more_blocks_than_the_pool_is_rejected(model_dir):
    llm = LLM(model_dir, num_kv_blocks=4, max_model_len=128, skip_tokenizer_init=True)
    prompt = {"prompt_token_ids": list(range(60))}
    with pytest.raises(InvalidRequestError) as info:
        generate(llm, prompt)  # 60 + 8 tokens need 5 blocks of 16
    assert info.value.param == "max_tokens"
    assert len(token_ids(generate(llm, prompt, GREEDY.replace(max_tokens=4)))[0]) == 4


def test_text_prompt_without_tokenizer_is_rejected(model_dir):
    llm = LLM(model_dir, num_kv_blocks=4, skip_tokenizer_init=True)
    with pytest.raises(InvalidRequestError) as info:
        generate(llm, "hello")
    assert info.value.param == "prompt"


def test_params_list_of_the_wrong_length_raises(llm):
    with pytest.raises(InvalidRequestError) as info:
        generate(llm, PROMPTS, [GREEDY, GREEDY])
    assert info.value.param == "sampling_params"
    with pytest.raises(InvalidRequestError) as info:
        generate(llm, PROMPTS, priority=[0])
    assert info.value.param == "priority"
    assert_no_leaks(llm)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_mid_generate_leaks_nothing(llm, reference, monkeypatch, error):
    runner = llm.engine.core.runner
    real_execute = runner.execute
    calls = []

    def failing_execute(scheduler_output, after_layer=None):
        calls.append(scheduler_output)
        if len(calls) == 3:  # after prefill and a decode: blocks are held, some cached
            raise error
        return real_execute(scheduler_output, after_layer)

    monkeypatch.setattr(runner, "execute", failing_execute)
    # A failed step fails its requests (RequestFailedError); an interrupt stays one.
    expected = RequestFailedError if isinstance(error, Exception) else type(error)
    with pytest.raises(expected):
        generate(llm, PROMPTS, GREEDY.replace(n=2))
    assert len(calls) == 3
    assert_no_leaks(llm)
    monkeypatch.undo()
    assert token_ids(generate(llm, PROMPTS)) == reference


def test_duplicate_request_id_is_rejected_without_touching_the_first(model_dir):
    # Through the engine the router drives: ids come from outside, so they can collide.
    engine = LLM(model_dir, num_kv_blocks=16, max_model_len=128).engine
    engine.add_request("dup", "Hello world", GREEDY.replace(max_tokens=3))
    with pytest.raises(InvalidRequestError):
        engine.add_request("dup", "Another prompt", GREEDY.replace(n=2))
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert [(o.request_id, o.prompt, len(o.outputs)) for o in finals] == [("dup", "Hello world", 1)]
    assert len(finals[0].outputs[0].token_ids) == 3
    assert engine.processor.states == {}


def test_unavailable_device_is_a_config_error(tmp_path):
    import torch

    from pdserve.errors import ConfigError
    from tests.helpers import make_hf_model_dir

    model_dir = make_hf_model_dir(tmp_path, "llama_mha")
    bad = ["not-a-device"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(ConfigError) as info:
            LLM(model_dir, device=device, skip_tokenizer_init=True, num_kv_blocks=8)
        assert info.value.field == "device"


def test_warmup_leaves_no_trace(model_dir, reference):
    """A worker's start-up warm-up runs the model outside the scheduler: afterwards the
    pool is zero, no block is held or cached, and greedy outputs are unchanged."""
    fresh = LLM(model_dir, num_kv_blocks=32, max_model_len=128)
    core = fresh.engine.core
    core.warmup()
    assert int(core.runner.kv_cache.count_nonzero()) == 0
    assert core.block_manager.num_free_blocks == 32
    assert core.block_manager.num_cached_blocks == 0
    assert [token_ids(generate(fresh, p))[0] for p in PROMPTS] == reference
    assert_no_leaks(fresh)
    with pytest.raises(RuntimeError, match="before any request"):
        core.requests["x"] = None
        core.warmup()
