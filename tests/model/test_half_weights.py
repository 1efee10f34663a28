"""bfloat16 and float16 models on CPU against transformers run with the same maths, greedy
token for token.

What a 16-bit model computes on CPU with the C kernels (README, "What `--dtype` means on
CPU"): the float32 model on the 16-bit-rounded weights, with keys and values rounded to 16
bits as they enter the KV pool. The reference is exactly that in transformers: the float32
model with every parameter rounded to the dtype and back, and a cache that rounds the keys
and values it stores (and returns) likewise. Both sides then run the same float32 maths up to
summation order, as the float32 oracle (test_hf_equivalence.py) does, so greedy outputs are
compared exactly — under batched decode (the products over 16-bit panels at several rows),
one request at a time (single-row steps), and chunked prefill.
"""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model.kernels import gemv
from tests.helpers import hf_model_greedy, make_hf_model_dir, torch_threads

pytestmark = pytest.mark.skipif(not gemv.is_available(), reason="C kernels unavailable")

PROMPT_LENGTHS = (1, 7, 16, 33, 70, 129)
NUM_NEW_TOKENS = 8
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# q/k/v and MLP biases, tied embeddings, q/k norms: every parameter kind is rounded.
KINDS = ("llama_gqa_llama3", "qwen2_tied", "qwen3_qk_norm", "llama_biases")


@pytest.fixture(scope="module", params=KINDS)
def model_dir(request, tmp_path_factory):
    return make_hf_model_dir(tmp_path_factory.mktemp("half"), request.param)


def _prompts() -> list[list[int]]:
    return [[(7 * i + 5 * j) % 500 + 3 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]


def _rounding_cache_class(dtype: torch.dtype):
    from transformers import DynamicCache

    class RoundingCache(DynamicCache):
        """Keys and values stored (and attended) as `dtype` values, held in float32."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            key_states = key_states.to(dtype).float()
            value_states = value_states.to(dtype).float()
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return RoundingCache


def _hf_same_maths(model_dir, dtype: torch.dtype) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():  # parameters only: RoPE's inv_freq stays float32
            param.copy_(param.to(dtype).float())
    cache_class = _rounding_cache_class(dtype)
    return hf_model_greedy(
        model.eval(), _prompts(), NUM_NEW_TOKENS, cache=lambda: cache_class(config=model.config)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_weights_equal_transformers_with_the_same_maths(model_dir, dtype):
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in _prompts()]
    with torch_threads(1):
        reference = _hf_same_maths(model_dir, DTYPES[dtype])
        llm = LLM(model_dir, dtype=dtype, skip_tokenizer_init=True, num_kv_blocks=64)
        model = llm.engine.core.runner.model
        assert model.compute_dtype == torch.float32  # activations, norms, attention
        assert model.lm_head_mm.small.dtype == DTYPES[dtype]  # the weights stay 16-bit
        assert llm.engine.core.runner.kv_cache.dtype == DTYPES[dtype]
        batched = llm.generate(inputs, params, use_tqdm=False)
        alone = [llm.generate(i, params, use_tqdm=False)[0] for i in inputs[:3]]
        chunked = LLM(
            model_dir,
            dtype=dtype,
            skip_tokenizer_init=True,
            num_kv_blocks=64,
            max_num_batched_tokens=48,
        ).generate(inputs, params, use_tqdm=False)
    assert reference != [reference[0]] * len(reference)  # not a degenerate model
    for outputs in (batched, chunked):
        assert [o.outputs[0].token_ids for o in outputs] == reference
    assert [o.outputs[0].token_ids for o in alone] == reference[:3]
