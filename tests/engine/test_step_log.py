"""`PDSERVE_STEP_LOG`: one line per engine step with the cost model's shape of the step —
exact token counts and attention sums of a chunked prompt and its decodes — and nothing
written when the variable is unset."""

from __future__ import annotations

import pytest

from pdserve.engine.step_log import ENV, read_step_log
from pdserve.sampling_params import SamplingParams
from tests.helpers import make_engine_core, make_hf_model_dir, torch_threads


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("steplog"), "llama_gqa_llama3")


def _run(model_dir, prompt_len: int, max_tokens: int) -> None:
    core = make_engine_core(
        model_dir,
        block_size=16,
        num_kv_blocks=16,
        max_model_len=256,
        max_num_batched_tokens=32,
        enable_chunked_prefill=True,
    )
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    core.add_request("a", [(5 * i + 1) % 400 + 1 for i in range(prompt_len)], params)
    with torch_threads(1):
        while core.has_unfinished_requests():
            core.step()
    core.close()


def test_each_step_is_logged_with_its_shape(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "log"))
    _run(model_dir, prompt_len=40, max_tokens=3)  # chunks of 32 + 8, then 2 decodes
    (records,) = read_step_log(tmp_path / "log").values()
    shapes = [
        (r["tokens"], r["sampled"], r["prefill_attention"], r["decode_context"]) for r in records
    ]
    assert shapes == [
        (32, 0, 32 * 32, 0),  # first chunk: q=32 after c=0, nothing sampled
        (8, 1, 8 * 40, 0),  # second chunk: q=8 after c=32, the first token sampled
        (1, 1, 0, 41),  # decode after 40 prompt tokens + 1 output: reads 41
        (1, 1, 0, 42),
    ]
    assert [(r["prefills"], r["decodes"]) for r in records] == [(1, 0), (1, 0), (0, 1), (0, 1)]
    for r in records:
        assert r["execute"] > 0 and r["schedule"] >= 0 and r["update"] >= 0
    starts = [r["t"] for r in records]
    assert starts == sorted(starts)


def test_nothing_is_written_when_unset(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    _run(model_dir, prompt_len=20, max_tokens=2)
    assert list(tmp_path.iterdir()) == []
