"""The SLO planner's request hints over HTTP: `expected_output_tokens` and `slo_class`
are validated like every other field (an OpenAI 400 naming the field), and what an
admitted request tells the planner's log — its prompt length, the hint instead of the
budget when given, its class — is exact, once per sample."""

from __future__ import annotations

import pytest

from pdserve.control.planner import RequestLog
from pdserve.router.app import build_app
from tests.router.fakes import ScriptedEngineClient
from tests.router.test_app import CHAT, CMPL, USER, error, post

pytestmark = pytest.mark.anyio


@pytest.fixture
def client(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    scripted = ScriptedEngineClient(
        Tokenizer.from_pretrained(builtin_model_dir), [("a", [10])], finish=True
    )
    scripted.request_log = RequestLog()
    return scripted


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"expected_output_tokens": 0}, "expected_output_tokens", "at least 1"),
        ({"expected_output_tokens": -5}, "expected_output_tokens", "at least 1"),
        ({"expected_output_tokens": 9}, "expected_output_tokens", "more than max_tokens (8)"),
        ({"expected_output_tokens": "many"}, "expected_output_tokens", "valid integer"),
        ({"expected_output_tokens": 2**64}, "expected_output_tokens", "less than or equal"),
        ({"expected_output_tokens": 1.5}, "expected_output_tokens", "valid integer"),
        ({"slo_class": ""}, "slo_class", "at least 1 character"),
        ({"slo_class": "a b"}, "slo_class", "match pattern"),
        ({"slo_class": "x" * 65}, "slo_class", "at most 64"),
        ({"slo_class": 3}, "slo_class", "valid string"),
    ],
)
async def test_bad_hints_are_400_naming_the_field(client, body, param, fragment):
    response = await post(build_app(client), CMPL, {"prompt": [5, 6, 7], "max_tokens": 8, **body})
    failure = error(response, 400)
    assert failure["param"] == param and fragment in failure["message"]
    assert client.started == [] and list(client.request_log.arrivals) == []


async def test_the_planner_log_gets_the_hint_and_the_class_per_sample(client):
    app = build_app(client)
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "n": 2, "expected_output_tokens": 3}
    assert (await post(app, CMPL, {**body, "slo_class": "long"})).status_code == 200
    assert (await post(app, CMPL, {"prompt": [5, 6, 7, 8], "max_tokens": 8})).status_code == 200
    chat = {"messages": USER, "max_tokens": 6, "expected_output_tokens": 6, "slo_class": "c.1"}
    assert (await post(app, CHAT, chat)).status_code == 200
    logged = [(a.prompt_tokens, a.output_tokens, a.slo_class) for a in client.request_log.arrivals]
    chat_prompt = logged[-1][0]
    assert logged == [(3, 3, "long"), (3, 3, "long"), (4, 8, None), (chat_prompt, 6, "c.1")]
    assert chat_prompt > 3


async def test_each_finished_prompt_reports_its_latencies_with_its_class(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    script = [("a", [10]), ("b", [11]), ("c", [12])]
    client = ScriptedEngineClient(Tokenizer.from_pretrained(builtin_model_dir), script, finish=True)
    client.request_log = RequestLog()
    body = {"prompt": [[5, 6], [7, 8]], "max_tokens": 8, "slo_class": "long", "stream": True}
    assert (await post(build_app(client), CMPL, body)).status_code == 200
    outcomes = list(client.request_log.outcomes)
    assert [o.slo_class for o in outcomes] == ["long", "long"]  # one per prompt
    assert all(o.ttft_s > 0 and o.tpot_s >= 0 for o in outcomes)
    failing = ScriptedEngineClient(client.tokenizer, unavailable=True)
    failing.request_log = RequestLog()
    assert (await post(build_app(failing), CMPL, {"prompt": "x"})).status_code == 503
    assert [(o.ttft_s, o.tpot_s) for o in failing.request_log.outcomes] == [(None, None)]
