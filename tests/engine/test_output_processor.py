"""OutputProcessor on the built-in tokenizer: stop strings (trim, include, earliest, spanning
tokens), streaming deltas that never retract text, n > 1 gathering, logprobs, aborts."""

from __future__ import annotations

import pytest

from pdserve.engine.output_processor import OutputProcessor, SampleState, find_stop_string
from pdserve.outputs import EngineCoreOutput, Logprob, RequestOutput
from pdserve.sampling_params import SamplingParams
from pdserve.tokenizer import Tokenizer

PROMPT = "Prompt:"
TEXT = " The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tokenizer(builtin_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(builtin_model_dir)


@pytest.fixture(scope="module")
def text_ids(tokenizer) -> list[int]:
    ids = tokenizer.encode(TEXT.strip(), add_special_tokens=False)
    # The premise of the stop-string tests: "brown" and "fox" span several tokens.
    pieces = [tokenizer.id_to_token(i) for i in ids]
    assert pieces[:8] == ["▁The", "▁quick", "▁b", "ro", "wn", "▁f", "o", "x"]
    return ids


class Run:
    """One request fed token by token through an OutputProcessor, as the engine would."""

    def __init__(self, tokenizer, request_id="r", prompt=PROMPT, **params):
        self.processor = OutputProcessor(tokenizer)
        self.prompt_ids = tokenizer.encode(prompt) if tokenizer else [1, 2, 3]
        self.params = SamplingParams(**params)
        self.request_id = request_id
        self.child_ids = self.processor.add_request(
            request_id, prompt, self.prompt_ids, self.params
        )
        state = self.processor.states[request_id]
        self.samples: list[SampleState] = list(state.samples)
        self.outputs: list[RequestOutput] = []
        self.aborts: list[str] = []

    def feed(self, token_ids, child=None, finish_reason=None, **fields) -> list[RequestOutput]:
        child = child or self.child_ids[0]
        results = []
        for i, token_id in enumerate(token_ids):
            last = i == len(token_ids) - 1
            out = EngineCoreOutput(
                child, [token_id], finish_reason=finish_reason if last else None, **fields
            )
            outputs, aborts = self.processor.process([out])
            self.aborts += aborts
            results += outputs
        self.outputs += results
        return results

    @property
    def last(self):
        return self.outputs[-1].outputs[0]


def test_stop_string_ends_generation_and_is_trimmed(tokenizer, text_ids):
    run = Run(tokenizer, stop=["fox"])
    run.feed(text_ids)
    final = run.outputs[-1]
    assert final.finished
    sample = final.outputs[0]
    assert (sample.finish_reason, sample.stop_reason) == ("stop", "fox")
    assert sample.text == " The quick brown "
    fox_end = next(i for i in range(len(text_ids)) if "fox" in tokenizer.decode(text_ids[: i + 1]))
    assert sample.token_ids == text_ids[: fox_end + 1]  # the completing token is kept
    assert run.aborts == ["r"]  # the caller must abort it in the core
    assert len(run.outputs) == fox_end + 1  # later core outputs for it are ignored
    assert run.processor.states == {}


def test_include_stop_str_in_output_keeps_it(tokenizer, text_ids):
    run = Run(tokenizer, stop=["fox"], include_stop_str_in_output=True)
    run.feed(text_ids)
    assert run.last.text == " The quick brown fox"
    assert run.last.stop_reason == "fox"


def test_stop_string_spanning_tokens_stops_on_the_completing_token(tokenizer, text_ids):
    run = Run(tokenizer, stop=["ick bro"])
    b, ro = tokenizer.token_to_id("▁b"), tokenizer.token_to_id("ro")
    run.feed(text_ids)
    assert run.last.token_ids == text_ids[: text_ids.index(ro) + 1]
    assert run.last.token_ids[-2:] == [b, ro]
    assert run.last.text == " The qu"
    assert run.last.stop_reason == "ick bro"


@pytest.mark.parametrize("stops", [("own", "row"), ("row", "own"), ("brown", "row", "quick b")])
def test_earliest_stop_string_wins_regardless_of_list_order(tokenizer, text_ids, stops):
    run = Run(tokenizer, stop=list(stops))
    run.feed(text_ids)
    expected = min(stops, key=lambda s: TEXT.index(s))
    assert run.last.stop_reason == expected
    assert run.last.text == TEXT[: TEXT.index(expected)]


def test_stop_string_wins_over_length_on_the_last_token(tokenizer, text_ids):
    run = Run(tokenizer, stop=["brown"])
    end = text_ids.index(tokenizer.token_to_id("wn")) + 1
    run.feed(text_ids[:end], finish_reason="length")
    assert (run.last.finish_reason, run.last.stop_reason) == ("stop", "brown")
    assert run.last.text == " The quick "


def test_stop_string_straddling_the_prompt_does_not_match(tokenizer, text_ids):
    run = Run(tokenizer, prompt="The quick br", stop=["brown"])
    wn = tokenizer.token_to_id("wn")
    run.feed([wn, *text_ids[-3:]], finish_reason="length")
    assert run.last.finish_reason == "length"
    assert run.last.stop_reason is None
    assert "brown" not in run.last.text


def test_core_finish_reasons_pass_through(tokenizer, text_ids):
    run = Run(tokenizer, stop_token_ids=[text_ids[2]])
    run.feed(text_ids[:3], finish_reason="stop", stop_reason=text_ids[2])
    assert (run.last.finish_reason, run.last.stop_reason) == ("stop", text_ids[2])
    assert run.last.text == " The quick b"
    assert run.aborts == []


# ---- streaming ---------------------------------------------------------------------------


def streamed(run: Run, token_ids: list[int]) -> list[str]:
    """Feed tokens one by one, taking the delta after each; return the deltas."""
    deltas = []
    for token_id in token_ids:
        if run.samples[0].finish_reason is not None:
            break
        run.feed([token_id])
        deltas.append(run.samples[0].take_delta())
    return deltas


def test_take_delta_holds_back_a_possible_stop_prefix(tokenizer, text_ids):
    run = Run(tokenizer, stop=["fox"])
    o = tokenizer.token_to_id("o")
    deltas = streamed(run, text_ids[: text_ids.index(o) + 1])  # text ends "... brown fo"
    assert run.samples[0].text.endswith("brown fo")
    assert "".join(deltas) == " The quick brown "  # "fo" may become "fox": held back


@pytest.mark.parametrize(
    "params",
    [
        {"stop": ["jumps"]},
        {"stop": ["jumps"], "include_stop_str_in_output": True},
        {"stop": ["the lazy", "x j", "zzz"]},
        {"stop": ["not there at all"]},
        {},
    ],
)
def test_deltas_concatenate_to_the_final_text_and_never_retract(tokenizer, text_ids, params):
    run = Run(tokenizer, **params)
    deltas = streamed(run, text_ids[:-1])
    if run.samples[0].finish_reason is None:
        run.feed(text_ids[-1:], finish_reason="length")
        deltas.append(run.samples[0].take_delta())
    final = run.last.text
    sent = ""
    for delta in deltas:
        sent += delta
        assert final.startswith(sent)  # nothing shown is ever taken back
    assert sent == final
    assert run.samples[0].take_delta() == ""


def test_without_stop_strings_deltas_are_immediate(tokenizer, text_ids):
    run = Run(tokenizer)
    assert streamed(run, text_ids[:3]) == [" The", " quick", " b"]


def test_find_stop_string_looks_only_at_new_text():
    assert find_stop_string("stop here stop", 4, ("stop",)) == ("stop", 10)
    assert find_stop_string("stop here", 4, ("stop",)) is None
    assert find_stop_string("xxsto" + "p", 1, ("stop",)) == ("stop", 2)
    assert find_stop_string("abcdef", 3, ("ef", "cde")) == ("cde", 2)


# ---- several samples, logprobs, aborts ---------------------------------------------------


def test_n_samples_are_gathered_under_the_parent_request(tokenizer, text_ids):
    run = Run(tokenizer, request_id="req", n=3, stop=["lazy"])
    assert run.child_ids == ["req", "req#1", "req#2"]
    run.feed(text_ids[:2], child="req#1", finish_reason="length")
    assert not run.outputs[-1].finished
    run.feed(text_ids, child="req#2")  # stopped by "lazy"
    assert not run.outputs[-1].finished
    run.feed(text_ids[:1], child="req", finish_reason="stop")
    final = run.outputs[-1]
    assert final.finished and final.request_id == "req"
    assert [o.index for o in final.outputs] == [0, 1, 2]
    assert [o.text for o in final.outputs] == [
        " The",
        " The quick",
        " The quick brown fox jumps over the ",
    ]
    assert [o.finish_reason for o in final.outputs] == ["stop", "length", "stop"]
    assert final.outputs[2].stop_reason == "lazy"
    assert run.aborts == ["req#2"]


def test_num_cached_tokens_and_prompt_are_reported(tokenizer, text_ids):
    run = Run(tokenizer)
    run.feed(text_ids[:2], finish_reason="length", num_cached_tokens=32)
    final = run.outputs[-1]
    assert final.num_cached_tokens == 32
    assert final.prompt == PROMPT
    assert final.prompt_token_ids == run.prompt_ids
    assert final.metrics.first_token_time is not None
    assert final.metrics.finished_time is not None


def test_logprobs_accumulate(tokenizer):
    run = Run(tokenizer, logprobs=1)
    outs = [
        EngineCoreOutput("r", [5], [{5: Logprob(-0.5, 1), 9: Logprob(-0.25, 1)}]),
        EngineCoreOutput("r", [7], [{7: Logprob(-1.5, 2)}], finish_reason="length"),
    ]
    for out in outs:
        run.outputs += run.processor.process([out])[0]
    assert run.last.cumulative_logprob == pytest.approx(-2.0)
    assert run.last.logprobs == [{5: Logprob(-0.5, 1), 9: Logprob(-0.25, 1)}, {7: Logprob(-1.5, 2)}]


def test_abort_forgets_the_request_and_ignores_late_outputs(tokenizer, text_ids):
    run = Run(tokenizer, request_id="x", n=2)
    run.feed(text_ids[:2], child="x")
    assert run.processor.abort_request("x") == ["x", "x#1"]
    assert run.processor.abort_request("x") == []
    assert run.processor.process([EngineCoreOutput("x#1", [5])]) == ([], [])
    assert run.processor.states == {}


def test_without_a_tokenizer_outputs_carry_ids_only(text_ids):
    run = Run(None, prompt=None, stop=["fox"])
    run.feed(text_ids, finish_reason="length")
    assert run.last.text == ""
    assert run.last.token_ids == text_ids
    assert run.last.finish_reason == "length"
