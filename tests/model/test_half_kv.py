"""The kernels over a 16-bit KV pool (what a bfloat16 or float16 model on CPU keeps): keys and
values are rounded into the pool exactly as torch rounds (`Tensor.to`), and attention over
the pool equals float64 attention over the same 16-bit values widened, within float32
rounding. Both instruction sets this host can run (the AVX2 build is tested on AVX-512 hosts
too)."""

from __future__ import annotations

import pytest
import torch

from pdserve.model import kernels
from tests.model.test_kernels import _reference, _scattered_case

pytestmark = pytest.mark.skipif(not kernels.is_available(), reason="no C compiler here")

HALF_DTYPES = (torch.bfloat16, torch.float16)


def _libraries() -> list[tuple[str, object]]:
    libs = [("native", kernels._library())]
    if "avx512f" in kernels.cpu_flags():
        libs.append(("avx2", kernels.variant(("-mno-avx512f",))))
    return libs


LIBRARIES = _libraries()


@pytest.mark.parametrize("isa,lib", LIBRARIES, ids=[name for name, _ in LIBRARIES])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_write_kv_rounds_like_torch(isa, lib, dtype):
    gen = torch.Generator().manual_seed(3)
    rows, heads, head_dim = 37, 3, 20  # 60 floats a row: a tail after 8-float vectors
    qkv = 4 * torch.randn(rows, 2 * heads + 5, head_dim, generator=gen)  # strided k and v
    k, v = qkv[:, :heads], qkv[:, heads : 2 * heads]
    k[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 3.4e38, -1e-40])  # overflow, tiny
    v[1, 0, :2] = torch.tensor([2.0**-130, 65519.0])  # subnormal in bf16; rounds up in f16
    k_cache = torch.zeros(12, 4, heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(48, generator=gen)[:rows]
    assert kernels.write_kv(k, v, k_cache, v_cache, slots, lib=lib)
    for cache, src in ((k_cache, k), (v_cache, v)):
        expected = torch.zeros_like(cache)
        expected.view(-1, heads, head_dim)[slots] = src.to(dtype)
        assert torch.equal(cache.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("isa,lib", LIBRARIES, ids=[name for name, _ in LIBRARIES])
def test_write_kv_refuses_a_slot_outside_the_pool(isa, lib):
    k = torch.ones(2, 1, 8)
    k_cache = torch.zeros(2, 4, 1, 8, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    with pytest.raises(IndexError):
        kernels.write_kv(k, k, k_cache, v_cache, torch.tensor([0, 8]), lib=lib)
    assert not k_cache.any()  # nothing written


@pytest.mark.parametrize("isa,lib", LIBRARIES, ids=[name for name, _ in LIBRARIES])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("group", "head_dim", "block_size"),
    [(2, 64, 16), (3, 64, 16), (2, 128, 16), (2, 20, 16), (1, 64, 5)],
)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_attention_over_a_16_bit_pool(isa, lib, dtype, group, head_dim, block_size, num_threads):
    lens = [1, 7, 9, block_size, 3 * block_size + 1, 100]
    num_kv_heads = 2
    q, k_cache, v_cache, tables, context_lens = _scattered_case(
        lens, group * num_kv_heads, num_kv_heads, head_dim, block_size
    )
    k16, v16 = k_cache.to(dtype), v_cache.to(dtype)
    expected = _reference(q, k16.float(), v16.float(), tables, context_lens, head_dim**-0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "MIN_BYTES_PER_THREAD", 1)
        mp.setattr(kernels, "_num_threads", num_threads)
        got = kernels.paged_decode_attention(
            q, k16, v16, tables, context_lens, head_dim**-0.5, lib=lib
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_engine_uses_the_kernel_for_a_16_bit_pool():
    q = torch.zeros(1, 2, 8)
    assert kernels.reads_kv(q, torch.zeros(1, dtype=torch.bfloat16))
    assert kernels.reads_kv(q, torch.zeros(1, dtype=torch.float16))
    assert not kernels.reads_kv(q.to(torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16))
