"""bfloat16 and float16 models on CPU (decode products through the gemv kernel, 16-bit weights
widened in registers) against transformers run in the same dtype: the same greedy first token
for nearly every prompt, and close log-probabilities. Exact equality is not asked: 16-bit
roundings differ between transformers' GEMM (native bf16 or emulated, by CPU) and the kernel's
float32 sums, so a near-tie may flip."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model.kernels import gemv
from tests.helpers import make_hf_model_dir, torch_threads

pytestmark = pytest.mark.skipif(not gemv.is_available(), reason="C kernels unavailable")

PROMPT_LENGTHS = (1, 7, 16, 33, 70, 129)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("half"), "llama_gqa_llama3")


def _prompts() -> list[list[int]]:
    return [[(7 * i + 5 * j) % 500 + 3 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]


def _hf_first_tokens(model_dir, dtype: torch.dtype) -> list[tuple[int, torch.Tensor]]:
    """transformers' greedy first token and the log-probabilities of the next position."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    results = []
    with torch.no_grad():
        for prompt in _prompts():
            logits = model(torch.tensor([prompt])).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            results.append((int(logprobs.argmax()), logprobs))
    return results


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_weights_track_transformers_in_the_same_dtype(model_dir, dtype):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    with torch_threads(1):
        llm = LLM(model_dir, dtype=dtype, skip_tokenizer_init=True, num_kv_blocks=64)
        model = llm.engine.core.runner.model
        # the decode-sized products of this engine are the gemv kernel's, on 16-bit panels
        assert model.lm_head_mm.small is not None
        assert model.lm_head_mm.small.dtype == DTYPES[dtype]
        inputs = [{"prompt_token_ids": p} for p in _prompts()]
        batched = llm.generate(inputs, params, use_tqdm=False)
        alone = [llm.generate(i, params, use_tqdm=False)[0] for i in inputs[:2]]  # 1-row steps
        reference = _hf_first_tokens(model_dir, DTYPES[dtype])
    for outputs in (batched, alone):
        same = 0
        for output, (hf_token, hf_logprobs) in zip(outputs, reference, strict=False):
            completion = output.outputs[0]
            assert len(completion.token_ids) == 4
            token = completion.token_ids[0]
            same += token == hf_token
            # 0.25 as in test_bfloat16: a few significant digits, different roundings
            got = completion.logprobs[0][token].logprob
            assert abs(got - float(hf_logprobs[token])) < 0.25
        assert same >= len(outputs) - 1
