"""One request cannot take the engine or another request down: a request whose
parameters break the sampler fails alone; a step that raises fails the step's requests
as retryable (the router moves them) and the engine goes on serving; a request resumed
with outputs it generated elsewhere continues exactly like one that was never moved."""

from __future__ import annotations

import pytest

from pdserve.engine.sampler import Sampler
from pdserve.sampling_params import SamplingParams
from tests.helpers import make_engine_core

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = {"a": [1, 2, 3, 4, 5], "b": [9, 8, 7, 6, 5, 4, 3], "c": [42] * 20}


@pytest.fixture(scope="module")
def core(builtin_model_dir):
    return make_engine_core(
        builtin_model_dir, num_kv_blocks=64, max_model_len=256, batch_invariant=True
    )


def run(core, requests: dict[str, tuple[list[int], SamplingParams]], **kw) -> dict[str, list[int]]:
    for request_id, (prompt, params) in requests.items():
        core.add_request(request_id, prompt, params, **kw.get(request_id, {}))
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


def assert_idle(core) -> None:
    assert not core.requests
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_a_request_that_breaks_the_sampler_fails_alone(core, monkeypatch):
    reference = run(core, {rid: (p, GREEDY) for rid, p in PROMPTS.items()})
    real = Sampler.__call__

    def breaks_on_b(self, logits, rows):
        if any(r.params.max_tokens == 7 for r in rows):  # request b's marker
            raise IndexError("index 32000 is out of bounds")
        return real(self, logits, rows)

    monkeypatch.setattr(Sampler, "__call__", breaks_on_b)
    requests = {rid: (p, GREEDY) for rid, p in PROMPTS.items()}
    requests["b"] = (PROMPTS["b"], GREEDY.replace(max_tokens=7))
    tokens = run(core, requests)
    failures = core.take_failures()
    assert [(f.request_id, f.retryable) for f in failures] == [("b", False)]
    assert "IndexError" in failures[0].message
    assert tokens["a"] == reference["a"] and tokens["c"] == reference["c"]
    assert tokens["b"] == []
    assert_idle(core)


def test_a_failed_step_fails_its_requests_as_retryable_and_the_engine_goes_on(core, monkeypatch):
    reference = run(core, {rid: (p, GREEDY) for rid, p in PROMPTS.items()})
    real = core.runner.execute
    calls = []

    def fails_third_step(output, after_layer=None):
        calls.append(output)
        if len(calls) == 3:
            raise RuntimeError("a kernel failed")
        return real(output, after_layer)

    monkeypatch.setattr(core.runner, "execute", fails_third_step)
    run(core, {rid: (p, GREEDY) for rid, p in PROMPTS.items()})
    failed = core.take_failures()
    scheduled = {item.request.request_id for item in calls[2].scheduled}
    assert {f.request_id for f in failed} == scheduled and scheduled
    assert all(f.retryable and "a kernel failed" in f.message for f in failed)
    assert_idle(core)
    monkeypatch.undo()
    assert run(core, {rid: (p, GREEDY) for rid, p in PROMPTS.items()}) == reference


@pytest.mark.parametrize("num_done", [1, 3, 5])
def test_a_resumed_request_continues_exactly(core, num_done):
    """Migration's engine half: prompt + the outputs generated elsewhere are recomputed,
    and the next tokens (greedy, and seeded: the (seed, index) stream) are the ones an
    undisturbed run gives (batch-invariant mode: the recompute's logits are bitwise the
    decode's)."""
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=6, ignore_eos=True)
    for params in (GREEDY, seeded):
        full = run(core, {"x": (PROMPTS["c"], params)})["x"]
        resumed = run(core, {"x": (PROMPTS["c"], params)}, x={"output_token_ids": full[:num_done]})
        assert full[:num_done] + resumed["x"] == full
        assert_idle(core)
