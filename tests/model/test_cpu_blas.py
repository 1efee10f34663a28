"""OpenBLAS products (`cpu_blas`) equal torch's, and the engine's tokens do not depend on
which library multiplies."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve import LLM, SamplingParams
from pdserve.model import cpu_blas
from tests.helpers import hf_greedy, make_hf_model_dir, torch_threads


def test_matmul_equals_linear():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 48, generator=gen)
    for rows in (1, 3, 64):
        x = torch.randn(rows, 48, generator=gen)
        got = cpu_blas.matmul(x, cpu_blas.host_view(weight))
        torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_only_float32_on_cpu_is_routed(monkeypatch):
    assert cpu_blas.is_enabled_for(torch.empty(2, 2))
    assert not cpu_blas.is_enabled_for(torch.empty(2, 2, dtype=torch.bfloat16))
    monkeypatch.setenv("PDSERVE_CPU_BLAS", "torch")
    assert not cpu_blas.is_enabled_for(torch.empty(2, 2))


def test_engine_tokens_match_with_and_without_openblas(tmp_path, monkeypatch):
    model_dir = make_hf_model_dir(tmp_path, "qwen2_tied")
    prompts = [[(5 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate((2, 31, 90))]
    reference = hf_greedy(model_dir, prompts, 10)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    results = {}
    for library in ("openblas", "torch"):
        monkeypatch.setenv("PDSERVE_CPU_BLAS", library)
        llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=64)
        assert llm.engine.core.runner.model.uses_cpu_blas == (library == "openblas")
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[library] = [o.outputs[0].token_ids for o in outputs]
    assert results["openblas"] == results["torch"] == reference


def test_generate_gives_torch_its_threads_back(tmp_path):
    """Decode steps run torch on one thread (OpenBLAS has the cores); afterwards torch code
    outside pdserve must find the thread count it had."""
    model_dir = make_hf_model_dir(tmp_path, "llama_mha")
    with torch_threads(2):
        llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=64)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
        assert torch.get_num_threads() == 2
