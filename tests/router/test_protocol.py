"""The OpenAI protocol layer: parsing, mapping to SamplingParams, exact response JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from pdserve.errors import InvalidRequestError
from pdserve.router.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
    error_body,
    sse_event,
)
from pdserve.sampling_params import SamplingParams

USER = {"role": "user", "content": "hi"}


def make_completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hello", **fields})


def make_chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [USER], **fields})


# -- prompts and messages -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        ("", [""]),
    ],
)
def test_prompt_forms_normalise_to_a_list(prompt, expected):
    assert make_completion(prompt=prompt).prompts == expected


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [-1], [True], None])
def test_bad_prompt_shapes_fail_to_parse(prompt):
    with pytest.raises(ValidationError) as info:
        make_completion(prompt=prompt)
    assert {error["loc"][0] for error in info.value.errors()} == {"prompt"}


def test_message_content_as_text_parts():
    request = make_chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "content": "42", "tool_call_id": "t1"},
        ]
    )
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert [m.text for m in request.messages] == ["be brief", "a\nb", "", "42"]


@pytest.mark.parametrize(
    ("messages", "loc"),
    [
        ([], ("messages",)),
        ([{"role": "wizard", "content": "x"}], ("messages", 0, "role")),
        ([{"role": "user"}], ("messages", 0)),
        ([{"role": "user", "content": [{"type": "image_url"}]}], ("messages", 0, "content")),
    ],
)
def test_bad_message_shapes_fail_to_parse(messages, loc):
    with pytest.raises(ValidationError) as info:
        make_chat(messages=messages)
    assert info.value.errors()[0]["loc"][: len(loc)] == loc


def test_unknown_fields_are_kept_aside_for_the_gateway():
    # The gateway refuses the ones that ask for a missing feature (tests/router/gateway).
    request = make_completion(logit_bias={"1": 5}, suffix="x", store=True)
    assert request.model_extra == {"logit_bias": {"1": 5}, "suffix": "x", "store": True}
    assert request.to_sampling_params(None) == SamplingParams()


# -- to_sampling_params ---------------------------------------------------------------------


def test_completion_defaults_match_openai():
    assert make_completion().to_sampling_params(100) == SamplingParams(max_tokens=16)


def test_completion_maps_every_field():
    request = make_completion(
        max_tokens=50,
        temperature=0.7,
        top_p=0.9,
        n=2,
        logprobs=3,
        stop="###",
        seed=7,
        presence_penalty=0,
        frequency_penalty=0.0,
        user="u1",
        top_k=40,
        min_p=0.05,
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=[5, 6],
        skip_special_tokens=False,
        include_stop_str_in_output=True,
    )
    assert request.to_sampling_params(None) == SamplingParams(
        n=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=7,
        max_tokens=50,
        min_tokens=2,
        stop=("###",),
        stop_token_ids=(5, 6),
        ignore_eos=True,
        logprobs=3,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
    )


def test_null_values_take_defaults():
    request = make_completion(max_tokens=None, temperature=None, top_p=None, n=None, top_k=-1)
    assert request.to_sampling_params(123) == SamplingParams(max_tokens=123)
    assert request.to_sampling_params(None).max_tokens is None


def test_many_stop_strings_are_allowed():
    stops = [f"s{i}" for i in range(10)]
    assert make_completion(stop=stops).to_sampling_params(None).stop == tuple(stops)


def test_temperature_zero_is_greedy():
    assert make_completion(temperature=0).to_sampling_params(None).is_greedy
    assert make_chat(temperature=0.0).to_sampling_params(None).is_greedy
    assert not make_chat().to_sampling_params(None).is_greedy


def test_chat_max_tokens_precedence():
    assert make_chat().to_sampling_params(500).max_tokens == 500
    assert make_chat().to_sampling_params(None).max_tokens is None
    assert make_chat(max_tokens=10).to_sampling_params(500).max_tokens == 10
    both = make_chat(max_tokens=10, max_completion_tokens=20)
    assert both.to_sampling_params(500).max_tokens == 20


@pytest.mark.parametrize(("logprobs", "expected"), [(None, None), (0, 0), (5, 5)])
def test_completion_logprobs_mapping(logprobs, expected):
    assert make_completion(logprobs=logprobs).to_sampling_params(None).logprobs == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"logprobs": False}, None),
        ({"logprobs": True}, 0),
        ({"logprobs": True, "top_logprobs": 0}, 0),
        ({"logprobs": True, "top_logprobs": 20}, 20),
    ],
)
def test_chat_logprobs_mapping(fields, expected):
    assert make_chat(**fields).to_sampling_params(None).logprobs == expected


@pytest.mark.parametrize(
    ("make", "fields", "param"),
    [
        (make_completion, {"temperature": -1}, "temperature"),
        (make_chat, {"temperature": -1}, "temperature"),
        (make_completion, {"top_p": 0}, "top_p"),
        (make_chat, {"n": 0}, "n"),
        (make_completion, {"max_tokens": 0}, "max_tokens"),
        (make_completion, {"logprobs": 6}, "logprobs"),
        (make_completion, {"logprobs": -1}, "logprobs"),
        (make_chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (make_chat, {"top_logprobs": 2}, "top_logprobs"),
        (make_completion, {"presence_penalty": 0.5}, "presence_penalty"),
        (make_chat, {"frequency_penalty": -1.0}, "frequency_penalty"),
        (make_chat, {"stream_options": {"include_usage": True}}, "stream_options"),
        (make_completion, {"stop": ["ok", ""]}, "stop"),
        (make_chat, {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ],
)
def test_bad_values_raise_invalid_request_error(make, fields, param):
    request = make(**fields)  # parses: the shape is fine, the meaning is not
    with pytest.raises(InvalidRequestError) as info:
        request.to_sampling_params(None)
    assert info.value.param == param
    assert param in str(info.value)


def test_presence_penalty_error_says_not_supported():
    with pytest.raises(InvalidRequestError, match="presence_penalty is not supported yet"):
        make_completion(presence_penalty=0.5).to_sampling_params(None)


@pytest.mark.parametrize(
    ("make", "fields", "param"),
    [
        (make_completion, {"temperature": "hot"}, "temperature"),
        (make_completion, {"n": 1.5}, "n"),
        (make_chat, {"stop": 3}, "stop"),
        (make_chat, {"logprobs": "maybe"}, "logprobs"),
    ],
)
def test_wrong_types_fail_to_parse(make, fields, param):
    with pytest.raises(ValidationError) as info:
        make(**fields)
    assert info.value.errors()[0]["loc"][0] == param


# -- responses ------------------------------------------------------------------------------


def test_completion_response_json():
    response = CompletionResponse(
        id="cmpl-1",
        created=1700000000,
        model="m",
        choices=[CompletionResponseChoice(text="hi", index=0, finish_reason="length")],
        usage=UsageInfo.of(3, 2, 1),
    )
    assert response.model_dump() == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m",
        "system_fingerprint": None,
        "choices": [{"text": "hi", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 1},
        },
    }


def test_chat_response_json():
    response = ChatCompletionResponse(
        id="chatcmpl-1",
        created=1700000000,
        model="m",
        choices=[
            ChatCompletionResponseChoice(
                index=0, message=ChatResponseMessage(content="hello"), finish_reason="stop"
            )
        ],
        usage=UsageInfo.of(4, 1),
    )
    assert response.model_dump() == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 4,
            "completion_tokens": 1,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_generated_ids_and_created():
    response = CompletionResponse(model="m", choices=[], usage=UsageInfo())
    chat = ChatCompletionResponse(model="m", choices=[], usage=UsageInfo())
    assert response.id.startswith("cmpl-") and len(response.id) == len("cmpl-") + 32
    assert chat.id.startswith("chatcmpl-") and chat.id != response.id
    assert isinstance(response.created, int) and response.created > 1_600_000_000


def test_completion_stream_chunk_json():
    chunk = CompletionStreamResponse(
        id="cmpl-1",
        created=1,
        model="m",
        choices=[CompletionResponseChoice(text="x", index=1)],
    )
    assert chunk.model_dump() == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "system_fingerprint": None,
        "choices": [{"text": "x", "index": 1, "logprobs": None, "finish_reason": None}],
        "usage": None,
    }


@pytest.mark.parametrize(
    ("delta", "finish_reason", "expected_delta"),
    [
        (DeltaMessage(role="assistant", content=""), None, {"role": "assistant", "content": ""}),
        (DeltaMessage(content="lo"), None, {"content": "lo"}),
        (DeltaMessage(), "stop", {}),
    ],
)
def test_chat_stream_chunk_json(delta, finish_reason, expected_delta):
    chunk = ChatCompletionStreamResponse(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[ChatCompletionStreamChoice(index=0, delta=delta, finish_reason=finish_reason)],
    )
    assert chunk.model_dump() == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "delta": expected_delta, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": None,
    }


def test_usage_only_chunk_json():
    chunk = ChatCompletionStreamResponse(
        id="chatcmpl-1", created=1, model="m", choices=[], usage=UsageInfo.of(2, 3)
    )
    assert json.loads(chunk.model_dump_json())["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_model_list_json():
    models = ModelList(data=[ModelCard(id="tiny", created=5)])
    assert models.model_dump() == {
        "object": "list",
        "data": [{"id": "tiny", "object": "model", "created": 5, "owned_by": "pdserve"}],
    }


def test_error_body():
    assert error_body("n must be at least 1, got 0", param="n") == {
        "error": {
            "message": "n must be at least 1, got 0",
            "type": "invalid_request_error",
            "param": "n",
            "code": None,
        }
    }
    assert error_body("boom", type="server_error", code="internal") == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": "internal"}
    }


def test_sse_event_format():
    chunk = ChatCompletionStreamResponse(
        id="c", created=1, model="m", choices=[ChatCompletionStreamChoice(index=0, delta={})]
    )
    event = sse_event(chunk)
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[len("data: ") : -2]) == chunk.model_dump()
    assert sse_event({"a": 1, "b": "é"}) == 'data: {"a":1,"b":"é"}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"


def test_router_does_not_import_torch():
    code = "import sys, pdserve.router.protocol; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
