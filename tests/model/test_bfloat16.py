"""bfloat16 runs every path (paged prefill, chunked prefill, decode through the PyTorch
attention fallback, prefix-cache hits) and stays within tolerance of float32: the same first
greedy token for nearly every prompt, and close logprobs."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from tests.helpers import make_hf_model_dir, torch_threads

PROMPT_LENGTHS = (1, 9, 16, 40, 77, 130, 200, 260)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("bf16"), "llama_gqa_llama3")


def _run(model_dir, dtype, **engine):
    prompts = [[(11 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    with torch_threads(1):
        llm = LLM(model_dir, dtype=dtype, skip_tokenizer_init=True, num_kv_blocks=128, **engine)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        block_manager = llm.engine.core.block_manager
        assert block_manager.num_free_blocks == block_manager.num_blocks
    return [o.outputs[0] for o in outputs]


def test_bfloat16_tracks_float32(model_dir):
    reference = _run(model_dir, "float32")
    for engine in ({}, {"max_num_batched_tokens": 48}):  # whole prompts, then chunks
        got = _run(model_dir, "bfloat16", **engine)
        assert all(len(o.token_ids) == 6 for o in got)
        first_same = sum(
            g.token_ids[0] == r.token_ids[0] for g, r in zip(got, reference, strict=True)
        )
        assert first_same >= len(PROMPT_LENGTHS) - 1
        for g, r in zip(got, reference, strict=True):
            if g.token_ids[0] == r.token_ids[0]:
                token = g.token_ids[0]
                # 0.25: bfloat16 keeps ~3 significant digits and its rounding differs between
                # torch's emulated GEMM (AVX2 CPUs) and native AVX512-BF16/AMX kernels; up to
                # 0.16 was seen on a Zen 4 host, up to 0.1 with emulation.
                assert abs(g.logprobs[0][token].logprob - r.logprobs[0][token].logprob) < 0.25
