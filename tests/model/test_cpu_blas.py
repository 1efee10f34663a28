"""CPU products (`cpu_blas`: the gemv kernel, oneDNN, OpenBLAS) equal torch's, each backend
routes the rows it should, and the engine's tokens do not depend on which library multiplies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve import LLM, SamplingParams
from pdserve.errors import ConfigError
from pdserve.model import cpu_blas
from tests.helpers import hf_greedy, make_hf_model_dir, torch_threads


@pytest.mark.parametrize("backend", ["auto", "onednn-openblas", "onednn", "openblas"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_equals_linear(backend, with_bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 48, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    param = torch.nn.Parameter(weight.clone(), requires_grad=False)
    mm = cpu_blas.CpuMatmul.prepare(param, backend, keep_dense=False)
    for rows in (1, 2, 3, 8, 9, 64, 65, 300):
        x = torch.randn(rows, 48, generator=gen)
        got = cpu_blas.linear(x, param, bias, mm)
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_weights_take_float32_rows_on_every_path(dtype):
    """A 16-bit model computes in float32: every row count, the kernel's (up to
    HALF_GEMV_MAX_ROWS) and oneDNN's float32 copy (above), gives the float32 product on the
    16-bit weight's values, and one 16-bit copy of the weight is all the kernel keeps."""
    gen = torch.Generator().manual_seed(1)
    param = torch.nn.Parameter(torch.randn(96, 48, generator=gen).to(dtype), requires_grad=False)
    weight = param.detach().float()
    bias = torch.randn(96, generator=gen)
    mm = cpu_blas.CpuMatmul.prepare(param, "auto", keep_dense=False)
    limit = cpu_blas.gemv_max_rows(dtype, "auto")
    assert limit in (cpu_blas.HALF_GEMV_MAX_ROWS, cpu_blas.HALF_GEMV_MAX_ROWS_AVX2)
    assert mm.max_gemv_rows == limit and mm.small.dtype == dtype
    assert mm.packed is not None and param.numel() == 0
    for rows in (1, 9, limit, limit + 1, 300):
        x = torch.randn(rows, 48, generator=gen)
        got = cpu_blas.linear(x, param, bias, mm)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_backends_route_rows_and_keep_or_release_the_dense_weight():
    def prepared(backend, keep_dense=False):
        param = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
        return param, cpu_blas.CpuMatmul.prepare(param, backend, keep_dense)

    param, mm = prepared("auto")
    assert mm.max_gemv_rows == mm.max_blas_rows == cpu_blas.GEMV_MAX_ROWS
    assert mm.small is not None and mm.packed is not None and mm.rows_major is None
    assert param.numel() == 0  # the gemv panels and oneDNN's copy replace it
    param, mm = prepared("onednn-openblas")
    assert mm.max_blas_rows == 1 and mm.packed is not None and mm.rows_major is not None
    assert param.shape == (8, 4)  # still usable by torch (a view of the [in, out] copy)
    param, mm = prepared("openblas")
    assert mm.max_blas_rows == cpu_blas.MAX_ROWS and mm.packed is None
    assert mm(torch.randn(cpu_blas.MAX_ROWS + 1, 4)) is None  # torch takes prefill sizes
    param, mm = prepared("onednn")
    assert mm.max_blas_rows == 0 and mm.rows_major is None
    assert param.numel() == 0  # one copy only: the packed one
    param, mm = prepared("onednn", keep_dense=True)  # e.g. a tied embedding
    assert param.shape == (8, 4)


def test_backend_setting_is_checked_and_auto_respects_memory(monkeypatch):
    assert cpu_blas.is_enabled_for(torch.empty(2, 2))
    assert cpu_blas.is_enabled_for(torch.empty(2, 2, dtype=torch.bfloat16))  # gemv kernel
    monkeypatch.setenv("PDSERVE_CPU_BLAS", "onednn")
    assert not cpu_blas.is_enabled_for(torch.empty(2, 2, dtype=torch.bfloat16))
    monkeypatch.setenv("PDSERVE_CPU_BLAS", "torch")
    assert not cpu_blas.is_enabled_for(torch.empty(2, 2))
    monkeypatch.setenv("PDSERVE_CPU_BLAS", "mkl")
    with pytest.raises(ConfigError, match="PDSERVE_CPU_BLAS"):
        cpu_blas.backend()
    monkeypatch.setenv("PDSERVE_CPU_BLAS", "auto")
    monkeypatch.setattr(cpu_blas, "physical_memory_bytes", lambda: 8 * 2**30)
    assert cpu_blas.resolve_backend(2**30) == "auto"  # two copies fit in 1/8 of RAM
    assert cpu_blas.resolve_backend(2**30 + 1) == "onednn"
    # 16-bit weights: the second copy is float32 (twice their size); without room for it the
    # gemv kernel takes every row count
    assert cpu_blas.resolve_backend(2**29, torch.bfloat16) == "auto"
    assert cpu_blas.resolve_backend(2**29 + 1, torch.bfloat16) == "auto-one-copy"


def test_engine_tokens_match_across_backends(tmp_path, monkeypatch):
    model_dir = make_hf_model_dir(tmp_path, "qwen2_tied")
    prompts = [[(5 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate((2, 31, 90))]
    reference = hf_greedy(model_dir, prompts, 10)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected_rows = {
        "auto": cpu_blas.GEMV_MAX_ROWS,
        "onednn-openblas": 1,
        "onednn": 0,
        "openblas": cpu_blas.MAX_ROWS,
        "torch": 0,
    }
    for backend, rows in expected_rows.items():
        monkeypatch.setenv("PDSERVE_CPU_BLAS", backend)
        llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=64)
        model = llm.engine.core.runner.model
        assert model.max_blas_rows == rows
        assert (model.lm_head_mm is None) == (backend == "torch")
        # batched (rows > 1) and one at a time (the single-row path)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == reference, backend
        single = llm.generate({"prompt_token_ids": prompts[1]}, params, use_tqdm=False)
        assert single[0].outputs[0].token_ids == reference[1], backend


def test_generate_gives_torch_its_threads_back(tmp_path):
    """Single-row decode steps run torch on one thread (OpenBLAS has the cores); afterwards
    torch code outside pdserve must find the thread count it had."""
    model_dir = make_hf_model_dir(tmp_path, "llama_mha")
    with torch_threads(2):
        llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=64)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
        assert torch.get_num_threads() == 2


def test_batch_invariant_backend_never_routes_rows_to_the_gemv_kernel():
    """gemv.c's sums depend on the row count; the invariant mode must keep gemm.c for all."""
    param = torch.nn.Parameter(torch.randn(40, 24), requires_grad=False)
    mm = cpu_blas.CpuMatmul.prepare(param, "invariant", keep_dense=False)
    assert mm.invariant is not None and mm.small is None
    assert mm.max_gemv_rows == mm.max_blas_rows == 0
    x = torch.randn(5, 24)
    alone = torch.cat([mm(x[i : i + 1]) for i in range(5)])
    assert torch.equal(mm(x), alone)  # each row bitwise the same alone or in the batch


def test_row_buckets_are_few_and_close_above_the_exact_range():
    buckets = {cpu_blas.bucket_rows(m) for m in range(1, 2049)}
    assert {cpu_blas.bucket_rows(m) for m in range(1, cpu_blas.BUCKET_EXACT_BELOW)} == set(
        range(1, cpu_blas.BUCKET_EXACT_BELOW)
    )
    assert len(buckets) <= 15 + 8 * 7 + 1  # 1-15, eight per doubling from 16 to 2047, 2048
    for m in range(1, 5000):
        bucket = cpu_blas.bucket_rows(m)
        assert m <= bucket <= m * 1.125
        assert cpu_blas.bucket_rows(bucket) == bucket  # a bucket is its own bucket


def test_padded_product_returns_only_the_real_rows():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 24, generator=gen)
    param = torch.nn.Parameter(weight.clone(), requires_grad=False)
    mm = cpu_blas.CpuMatmul.prepare(param, "auto", keep_dense=False)
    seen = []
    real = cpu_blas.CpuMatmul._onednn
    cpu_blas.CpuMatmul._onednn = lambda self, x, bias: seen.append(x.clone()) or real(self, x, bias)
    try:
        x = torch.randn(17, 24, generator=gen)
        y = mm(x)
    finally:
        cpu_blas.CpuMatmul._onednn = real
    assert y.shape == (17, 40)
    assert [t.shape[0] for t in seen] == [18]
    assert torch.equal(seen[0][:17], x) and torch.equal(seen[0][17:], torch.zeros(1, 24))
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def _row_by_row_onednn(rows_seen):
    """oneDNN one row at a time: each row's result is then the same whatever the batch, so
    padded and unpadded runs must agree bit for bit (real oneDNN may pick different kernels
    for different row counts, which no test may depend on)."""
    real = cpu_blas.CpuMatmul._onednn

    def onednn(self, x, bias):
        rows_seen.add(x.shape[0])
        return torch.cat([real(self, x[i : i + 1], bias) for i in range(x.shape[0])])

    return onednn


def _prefill_run(model_dir, prompts, monkeypatch, pad: str):
    monkeypatch.setenv("PDSERVE_PAD_ROWS", pad)
    rows_seen: set[int] = set()
    monkeypatch.setattr(cpu_blas.CpuMatmul, "_onednn", _row_by_row_onednn(rows_seen))
    llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=96, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    return tokens, llm.engine.core.runner.kv_cache.clone(), rows_seen


def test_padded_prefill_gives_the_same_tokens_and_kv_as_unpadded(tmp_path, monkeypatch):
    model_dir = make_hf_model_dir(tmp_path, "llama_mha")
    prompts = [[(7 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate((17, 45, 101))]
    padded_tokens, padded_kv, padded_rows = _prefill_run(model_dir, prompts, monkeypatch, "1")
    exact_tokens, exact_kv, exact_rows = _prefill_run(model_dir, prompts, monkeypatch, "0")
    assert padded_tokens == exact_tokens == hf_greedy(model_dir, prompts, 3)
    assert torch.equal(padded_kv, exact_kv)  # every block, every layer, keys and values
    assert 17 + 45 + 101 in exact_rows  # the one prefill step, unpadded
    assert cpu_blas.bucket_rows(163) in padded_rows and 163 not in padded_rows
    assert all(cpu_blas.bucket_rows(m) == m for m in padded_rows)


def test_prefill_row_counts_that_reach_the_library_are_bounded(tmp_path, monkeypatch):
    """60 prompts of 60 different lengths, one per step: without buckets 60 shapes."""
    model_dir = make_hf_model_dir(tmp_path, "llama_mha")
    monkeypatch.setenv("PDSERVE_PAD_ROWS", "1")
    rows_seen: set[int] = set()
    real = cpu_blas.CpuMatmul._onednn

    def onednn(self, x, bias):
        rows_seen.add(x.shape[0])
        return real(self, x, bias)

    monkeypatch.setattr(cpu_blas.CpuMatmul, "_onednn", onednn)
    llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=64, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for n in range(16, 256, 4):
        llm.generate(
            {"prompt_token_ids": [3 + (n + j) % 400 for j in range(n)]}, params, use_tqdm=False
        )
    assert rows_seen <= {cpu_blas.bucket_rows(m) for m in range(16, 256)}
    assert len(rows_seen) <= 8 * 4  # four doublings (16-255), eight buckets each
