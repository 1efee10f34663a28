"""The C decode-attention kernel equals the PyTorch path it replaces, and the engine gives
the same tokens with and without it."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model import kernels
from pdserve.model.attention import AttentionMetadata, _decode_attention_torch
from tests.helpers import hf_greedy, make_hf_model_dir, torch_threads

pytestmark = pytest.mark.skipif(not kernels.is_available(), reason="no C compiler here")


def _random_case(num_seqs, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    max_blocks = 6
    # Lengths cover 1 token, an exact block multiple, and a partial last block.
    lens = [1, block_size, 2 * block_size + 3, max_blocks * block_size][:num_seqs]
    lens += [5] * (num_seqs - len(lens))
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks]
    tables = tables.view(num_seqs, max_blocks).contiguous()
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize(
    ("num_seqs", "num_heads", "num_kv_heads", "head_dim", "block_size"),
    [
        (1, 4, 4, 64, 16),  # MHA
        (4, 8, 2, 64, 16),  # GQA, group 4
        (3, 6, 3, 128, 8),  # head_dim 128, small blocks
        (5, 2, 1, 32, 32),  # MQA
    ],
)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_kernel_equals_pytorch(
    num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_threads
):
    q, k_cache, v_cache, tables, lens = _random_case(
        num_seqs, num_heads, num_kv_heads, head_dim, block_size
    )
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0), decode_block_tables=tables, decode_context_lens=lens
    )
    expected = _decode_attention_torch(q, k_cache, v_cache, meta)
    # Force the threaded split even for small inputs.
    with torch_threads(num_threads), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "MIN_BYTES_PER_THREAD", 1)
        got = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_engine_tokens_match_with_and_without_kernel(tmp_path, monkeypatch):
    model_dir = make_hf_model_dir(tmp_path, "llama_gqa_llama3")
    prompts = [[(7 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate((1, 17, 40, 130))]
    reference = hf_greedy(model_dir, prompts, 12)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    results = {}
    for use_kernel in (True, False):
        monkeypatch.setattr(kernels, "is_available", lambda use=use_kernel: use)
        llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=64)
        outputs = llm.generate(inputs, params, use_tqdm=False)
        results[use_kernel] = [o.outputs[0].token_ids for o in outputs]
    assert results[True] == results[False] == reference
