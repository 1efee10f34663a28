"""The same engine on a CUDA device: greedy tokens equal transformers' (skipped without one)."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from tests.helpers import hf_greedy, make_hf_model_dir


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama_gqa_llama3", "qwen2_tied"])
def test_cuda_greedy_equals_transformers(tmp_path, kind):
    model_dir = make_hf_model_dir(tmp_path, kind)
    prompts = [[(13 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate((1, 17, 100, 300))]
    reference = hf_greedy(model_dir, prompts, 12)
    llm = LLM(model_dir, device="cuda", skip_tokenizer_init=True, num_kv_blocks=128)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
