"""int8 KV quantisation: shapes, the round-trip error bound, zero heads, byte counts, and
that scales really are per (block, head) — one loud head does not coarsen its neighbours."""

from __future__ import annotations

import pytest
import torch

from pdserve.kv import int8

POOL_BLOCK = (2, 2, 4, 3, 8)  # a per-block slice of the pool: [L, 2, B, H, D]
BATCH = (2, 2, 5, 4, 3, 8)  # a batch of blocks: [L, 2, n, B, H, D]


def randn(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


@pytest.mark.parametrize("shape", [(4, 3, 8), POOL_BLOCK, BATCH])
def test_shapes_and_dtypes(shape):
    q, scales = int8.quantize(randn(shape))
    assert q.shape == shape and q.dtype == torch.int8
    assert scales.shape == (*shape[:-3], shape[-2]) and scales.dtype == torch.float32
    assert int8.dequantize(q, scales, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_at_most_half_a_step(dtype):
    x = randn(BATCH, seed=1, dtype=dtype)
    q, scales = int8.quantize(x)
    back = int8.dequantize(q, scales, torch.float32)
    step = scales[..., None, :, None].expand(BATCH)  # each element's scale
    error = (x.float() - back).abs()
    # scale/2, plus the float32 rounding of x/scale and of q*scale (a few ulps of |x|):
    # x/scale can land exactly on k+0.5 from just above it and round to even.
    eps = 4 * torch.finfo(torch.float32).eps * x.float().abs()
    assert torch.all(error <= step / 2 + eps)
    assert q.abs().max().item() == 127  # the largest value of each head maps to +-127
    assert int(q.min()) >= -127


def test_scale_is_absmax_over_the_heads_tokens_and_channels():
    x = randn((4, 3, 8), seed=2)
    _, scales = int8.quantize(x)
    expected = x.abs().amax(dim=(0, 2)) / 127
    torch.testing.assert_close(scales, expected, rtol=0, atol=0)


def test_a_loud_head_does_not_coarsen_the_others():
    x = randn((4, 3, 8), seed=3)
    x[:, 1] *= 1000
    q, scales = int8.quantize(x)
    back = int8.dequantize(q, scales, torch.float32)
    quiet = (x[:, [0, 2]] - back[:, [0, 2]]).abs().max()
    assert quiet <= x[:, [0, 2]].abs().max() / 127 / 2 * (1 + 1e-5)


def test_all_zero_head_round_trips_to_zeros():
    x = randn(POOL_BLOCK, seed=4)
    x[1, 0, :, 2] = 0  # layer 1, keys, head 2
    x[0] = 0  # a whole layer of zeros (unwritten slots)
    q, scales = int8.quantize(x)
    assert scales[1, 0, 2] == 1.0 and torch.all(scales[0] == 1.0)
    back = int8.dequantize(q, scales, torch.float32)
    assert torch.all(back[0] == 0) and torch.all(back[1, 0, :, 2] == 0)
    assert torch.isfinite(back).all()


def test_each_block_quantises_alone():
    """A batch's q and scales equal those of its blocks quantised one by one (tiers and the
    wire may split or merge batches freely)."""
    x = randn(BATCH, seed=5)
    q, scales = int8.quantize(x)
    for i in range(BATCH[2]):
        q_i, s_i = int8.quantize(x[:, :, i])
        assert torch.equal(q[:, :, i], q_i) and torch.equal(scales[:, :, i], s_i)


def test_dequantize_into_a_pool_slice():
    pool = torch.zeros((2, 2, 6, 4, 3, 8), dtype=torch.bfloat16)
    x = randn((2, 2, 2, 4, 3, 8), seed=6)
    q, scales = int8.quantize(x)
    int8.dequantize_into(pool[:, :, 3:5], q, scales)
    assert torch.equal(pool[:, :, 3:5], int8.dequantize(q, scales, torch.bfloat16))
    assert torch.all(pool[:, :, :3] == 0) and torch.all(pool[:, :, 5:] == 0)


def test_num_bytes():
    # 2*2*5 blocks-of-a-layer of 4*3*8 int8 values, plus 2*2*5*3 float32 scales.
    assert int8.num_bytes(BATCH) == 2 * 2 * 5 * 4 * 3 * 8 + 2 * 2 * 5 * 3 * 4


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda q, s: (q.float(), s), "int8"),
        (lambda q, s: (q, s[..., :2]), "do not match"),
    ],
)
def test_dequantize_rejects_mismatched_input(bad, match):
    q, scales = int8.quantize(randn((4, 3, 8)))
    with pytest.raises(ValueError, match=match):
        int8.dequantize(*bad(q, scales), torch.float32)


def test_quantize_rejects_low_rank():
    with pytest.raises(ValueError, match="block_size"):
        int8.quantize(torch.ones(3, 8))
