"""The built-in workloads: reproducible from the seed, the documented length distributions,
exact prompt lengths with the built-in tokenizer, shared prefixes that a block-hash prefix
cache would hit, and `random:` spec parsing."""

from __future__ import annotations

import collections
import itertools
import statistics
from collections import defaultdict

import pytest

from pdserve.bench.types import RequestSpec
from pdserve.bench.workloads import WORKLOADS, get_workload
from pdserve.errors import ConfigError

NAMES = ["chat", "code", "summarize", "rag", "multiturn", "agent", "random"]


@pytest.fixture(scope="module")
def tokenizer(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(builtin_model_dir)


def input_lengths(specs: list[RequestSpec]) -> list[int]:
    """Prompt tokens of the built-in model without a tokenizer: BOS plus one per word."""
    return [len(spec.prompt.split()) + 1 for spec in specs]


def percentile(values: list[int], q: float) -> float:
    return statistics.quantiles(values, n=100)[round(q * 100) - 1]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def by_session(specs: list[RequestSpec]) -> dict[str, list[RequestSpec]]:
    sessions: dict[str, list[RequestSpec]] = defaultdict(list)
    for spec in specs:
        sessions[spec.session_id].append(spec)
    return sessions


# ---------------------------------------------------------------------------- the registry
def test_registry_names_descriptions_and_slos():
    assert list(WORKLOADS) == NAMES
    for name, workload in WORKLOADS.items():
        assert get_workload(name) is workload
        assert workload.name == name and workload.description
        assert 0 < workload.default_slo.tpot_ms < workload.default_slo.ttft_ms
    assert WORKLOADS["code"].default_slo.ttft_ms < WORKLOADS["chat"].default_slo.ttft_ms
    assert WORKLOADS["chat"].default_slo.ttft_ms < WORKLOADS["summarize"].default_slo.ttft_ms


def test_unknown_workload_names_the_choices():
    with pytest.raises(ConfigError, match="chat, code, summarize") as info:
        get_workload("chatty")
    assert info.value.field == "workload"


def test_num_requests_is_checked():
    assert WORKLOADS["chat"].sample(0) == []
    with pytest.raises(ConfigError) as info:
        WORKLOADS["chat"].sample(-1)
    assert info.value.field == "num_requests"


# --------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_specs_other_seed_other_specs(name):
    workload = WORKLOADS[name]
    first = workload.sample(12, seed=3)
    assert len(first) == 12
    assert workload.sample(12, seed=3) == first
    assert workload.sample(12, seed=4) != first


def test_builtin_tokenizer_changes_counts_not_text(tokenizer):
    """Every word is one token of the built-in model, so the estimate is already exact."""
    plain = WORKLOADS["chat"].sample(20, seed=1)
    exact = WORKLOADS["chat"].sample(20, seed=1, tokenizer=tokenizer)
    assert [s.prompt for s in exact] == [s.prompt for s in plain]
    assert [s.max_tokens for s in exact] == [s.max_tokens for s in plain]
    assert all(s.num_prompt_tokens is None for s in plain)
    assert [s.num_prompt_tokens for s in exact] == input_lengths(plain)


# ------------------------------------------------------------------------------ lengths
def test_chat_is_long_tailed_around_the_documented_medians():
    specs = WORKLOADS["chat"].sample(1000, seed=0)
    inputs, outputs = input_lengths(specs), [s.max_tokens for s in specs]
    assert 140 <= statistics.median(inputs) <= 180  # lognormal median 160, sigma 1.0
    assert 480 <= percentile(inputs, 0.9) <= 690  # 577 before clipping
    assert min(inputs) >= 4 and max(inputs) <= 1024
    assert 110 <= statistics.median(outputs) <= 146  # median 128, sigma 0.9
    assert 340 <= percentile(outputs, 0.9) <= 480  # 405
    assert min(outputs) >= 4 and max(outputs) <= 1024


def test_code_is_short_and_summarize_long():
    code = WORKLOADS["code"].sample(300, seed=0)
    assert 56 <= statistics.median(input_lengths(code)) <= 72
    assert 28 <= statistics.median(s.max_tokens for s in code) <= 36
    assert max(input_lengths(code)) <= 384 and max(s.max_tokens for s in code) <= 128
    summarize = WORKLOADS["summarize"].sample(200, seed=0)
    inputs = input_lengths(summarize)
    assert 1400 <= statistics.median(inputs) <= 1680
    assert min(inputs) >= 1024 and max(inputs) <= 4096
    assert max(s.max_tokens for s in summarize) <= 256


@pytest.mark.parametrize("name", ["chat", "code", "summarize", "rag", "agent"])
def test_num_prompt_tokens_is_the_measured_length(tokenizer, name):
    for spec in WORKLOADS[name].sample(8, seed=2, tokenizer=tokenizer):
        assert spec.num_prompt_tokens == len(tokenizer.encode(spec.prompt))


def test_random_spec_lengths_are_exact_with_the_tokenizer(tokenizer):
    fixed = get_workload("random:in=300,out=7").sample(5, tokenizer=tokenizer)
    assert [(s.num_prompt_tokens, s.max_tokens) for s in fixed] == [(300, 7)] * 5
    assert all(len(tokenizer.encode(s.prompt)) == 300 for s in fixed)
    ranged = get_workload("random:in=100-200,out=1-3").sample(50, tokenizer=tokenizer)
    assert all(100 <= s.num_prompt_tokens <= 200 and 1 <= s.max_tokens <= 3 for s in ranged)
    assert len({s.num_prompt_tokens for s in ranged}) > 10


# --------------------------------------------------------------------------- shared prefixes
def test_rag_requests_share_document_prefixes_token_for_token(tokenizer):
    specs = WORKLOADS["rag"].sample(40, seed=0, tokenizer=tokenizer)
    heads: dict[str, list[RequestSpec]] = defaultdict(list)
    for spec in specs:
        head, sep, question = spec.prompt.rpartition("\n\nquestion: ")
        assert sep and 8 <= len(question.split()) <= 128
        heads[head + "\n\nquestion:"].append(spec)
    assert len(heads) <= 4 and max(len(group) for group in heads.values()) >= 10
    for head, group in heads.items():
        head_ids = tokenizer.encode(head)
        assert 1024 <= len(head_ids) <= 2048 + 8
        for spec in group:
            assert tokenizer.encode(spec.prompt)[: len(head_ids)] == head_ids


def test_agent_shares_the_tool_description_and_grows_a_scratchpad(tokenizer):
    specs = WORKLOADS["agent"].sample(30, seed=0, tokenizer=tokenizer)
    system = specs[0].prompt.partition("\n\ntask:")[0]
    assert len(tokenizer.encode(system)) == 1536
    assert all(spec.prompt.startswith(system + "\n\ntask: ") for spec in specs)
    sessions = by_session(specs)
    assert len(sessions) > 1 and max(len(steps) for steps in sessions.values()) > 1
    for steps in sessions.values():
        for before, after in itertools.pairwise(steps):
            assert after.prompt.startswith(before.prompt + " ")
            ids = tokenizer.encode(after.prompt)
            assert common_prefix(tokenizer.encode(before.prompt), ids) == before.num_prompt_tokens
            # the scratchpad grows by the previous step's output and an observation
            assert after.num_prompt_tokens > before.num_prompt_tokens + before.max_tokens


def test_multiturn_resends_the_history_as_messages(tokenizer):
    specs = WORKLOADS["multiturn"].sample(40, seed=0, tokenizer=tokenizer)
    assert all(s.prompt is None and s.messages and s.session_id for s in specs)
    assert len({s.messages[0]["content"] for s in specs}) == 1  # one shared system message
    sessions = by_session(specs)
    positions = {id(spec): index for index, spec in enumerate(specs)}
    assert any(  # sessions are interleaved, not sent one after another
        positions[id(turns[-1])] - positions[id(turns[0])] >= len(turns)
        for turns in sessions.values()
    )
    for turns in sessions.values():
        rendered = [tokenizer.apply_chat_template(t.messages) for t in turns]
        ids = [tokenizer.encode(text, add_special_tokens=False) for text in rendered]
        for turn, turn_ids in zip(turns, ids, strict=True):
            assert turn.num_prompt_tokens == len(turn_ids)
        for k in range(1, len(turns)):
            previous, current = turns[k - 1], turns[k]
            assert current.messages[: len(previous.messages)] == previous.messages
            assert [m["role"] for m in current.messages[len(previous.messages) :]] == [
                "assistant",
                "user",
            ]
            assert len(current.messages[-2]["content"].split()) == previous.max_tokens
            assert rendered[k].startswith(rendered[k - 1])
            assert ids[k][: len(ids[k - 1])] == ids[k - 1]


# ------------------------------------------------------------------------------ random: specs
@pytest.mark.parametrize(
    ("spec", "lengths"),
    [
        ("random", ("512", "128")),
        ("random:in=512,out=128", ("512", "128")),
        ("random:in=128-1024,out=16-256", ("128-1024", "16-256")),
        ("random:out=7", ("512", "7")),
        ("random: in = 64 , out = 8-8", ("64", "8")),
    ],
)
def test_random_specs(spec, lengths):
    workload = get_workload(spec)
    assert (str(workload.input_tokens), str(workload.output_tokens)) == lengths
    assert workload.default_slo == WORKLOADS["random"].default_slo


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ("random:in=abc", "workload.in", "LO-HI"),
        ("random:in=0", "workload.in", "1 <= LO"),
        ("random:out=9-3", "workload.out", "1 <= LO"),
        ("random:out=-3", "workload.out", "LO-HI"),
        ("random:in=1,in=2", "workload.in", "twice"),
        ("random:tokens=5", "workload", "'tokens'"),
        ("random:in", "workload", "key=value"),
        ("chat:in=5", "workload", "unknown workload"),
    ],
)
def test_bad_random_specs_name_the_field(spec, field, words):
    with pytest.raises(ConfigError, match=words) as info:
        get_workload(spec)
    assert info.value.field == field


# ------------------------------------------------------------ Zipf-popular shared prefixes
def test_rag_and_agent_specs_set_the_shared_prefixes_and_their_popularity():
    rag = get_workload("rag:documents=64,zipf=1.2")
    assert (rag.num_documents, rag.popularity_exponent) == (64, 1.2)
    assert rag.name == "rag:documents=64,zipf=1.2"
    assert rag.document_tokens == WORKLOADS["rag"].document_tokens
    agent = get_workload("agent:systems=8")
    assert (agent.num_systems, agent.popularity_exponent) == (8, 1.0)
    assert agent.default_slo == WORKLOADS["agent"].default_slo


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("rag:documents=0", "workload.documents"),
        ("rag:zipf=x", "workload.zipf"),
        ("rag:zipf=inf", "workload.zipf"),
        ("rag:systems=3", "workload"),
        ("agent:systems=2,systems=3", "workload.systems"),
    ],
)
def test_bad_shared_specs_name_the_field(spec, field):
    with pytest.raises(ConfigError) as info:
        get_workload(spec)
    assert info.value.field == field


def test_agent_sessions_pick_tool_descriptions_by_zipf_popularity():
    workload = get_workload("agent:systems=6,zipf=1.5")
    specs = workload.sample(400, seed=0)
    first_steps = [steps[0] for steps in by_session(specs).values()]
    systems = [spec.prompt.partition("\n\ntask:")[0] for spec in first_steps]
    counts = sorted(collections.Counter(systems).values(), reverse=True)
    assert len(counts) == 6 and counts[0] > 3 * counts[-1]
    for steps in by_session(specs).values():  # a session keeps its agent
        head = steps[0].prompt.partition("\n\ntask:")[0]
        assert all(spec.prompt.startswith(head + "\n\ntask:") for spec in steps)
