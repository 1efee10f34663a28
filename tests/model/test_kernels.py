"""The C decode-attention kernel equals the PyTorch path it replaces, and the engine gives
the same tokens with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
    expected = _decode_attention_torch(q, k_cache, v_cache, tables, meta.get_decode_mask)
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


def _reference(q, k_cache, v_cache, tables, lens, scale):
    """Attention per sequence in float64 over only the blocks its length covers."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    out = []
    for s, length in enumerate(lens.tolist()):
        blocks = tables[s, : -(-length // block_size)]
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:length].double()
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:length].double()
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.einsum("hd,hld->hl", q[s].double(), keys) * scale
        out.append(torch.einsum("hl,hld->hd", scores.softmax(-1), values))
    return torch.stack(out).float()


def _scattered_case(lens, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    """Random KV pool; each sequence's blocks a random subset of it, rows padded with ids
    past the pool (the kernel must never read a table entry its length does not cover)."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    max_blocks = max(needed) + 2
    tables = torch.full((len(lens), max_blocks), 1 << 40, dtype=torch.int64)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    for s, n in enumerate(needed):
        tables[s, :n] = torch.tensor(ids[:n])
        ids = ids[n:]
    # Scores of a few units, like a trained model's, so the softmax is not uniform.
    q = 3 * torch.randn(len(lens), num_heads, head_dim, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize(
    ("group", "head_dim", "block_size"),
    [
        (1, 64, 16),  # MHA
        (2, 64, 16),  # the built-in model
        (4, 64, 16),
        (3, 64, 16),  # an odd group: one pair of heads plus one
        (2, 128, 16),
        (2, 80, 16),  # not a multiple of 32 floats
        (2, 20, 16),  # not a multiple of 8 floats: scalar tail
        (2, 64, 5),  # token groups straddle blocks
        (1, 64, 1),
    ],
)
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_kernel_edge_shapes_equal_float64_reference(group, head_dim, block_size, num_threads):
    lens = [1, 7, 8, 9, block_size, 3 * block_size + 1, 33, 100]
    num_kv_heads = 2
    case = _scattered_case(lens, group * num_kv_heads, num_kv_heads, head_dim, block_size)
    expected = _reference(*case, head_dim**-0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "MIN_BYTES_PER_THREAD", 1)
        mp.setattr(kernels, "_num_threads", num_threads)
        got = kernels.paged_decode_attention(*case, head_dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_kernel_long_context_equals_float64_reference(num_threads):
    # One long sequence and a short one: the split by cost gives the long one's kv heads to
    # different threads.
    case = _scattered_case([4096, 3], 8, 4, 64, 16, seed=1)
    expected = _reference(*case, 0.125)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_num_threads", num_threads)
        got = kernels.paged_decode_attention(*case, 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_threads", [2, 5, 16])
def test_kernel_split_covers_every_head_once(num_threads):
    # More parts than some sequences have kv heads, and parts that get no work at all.
    case = _scattered_case([300, 1, 40], 4, 2, 32, 16, seed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "MIN_BYTES_PER_THREAD", 1)
        mp.setattr(kernels, "_num_threads", 1)
        single = kernels.paged_decode_attention(*case, 0.2)
        mp.setattr(kernels, "_num_threads", num_threads)
        split = kernels.paged_decode_attention(*case, 0.2)
    torch.testing.assert_close(split, single, rtol=0, atol=0)
    torch.testing.assert_close(single, _reference(*case, 0.2), rtol=1e-5, atol=1e-6)


def test_kernel_handles_extreme_scores():
    # Score gaps of hundreds: most weights underflow to exactly 0, and the running max
    # must be rescaled when a larger score arrives late in the context.
    case = _scattered_case([50, 200], 4, 2, 64, 16, seed=3)
    q = case[0] * 40
    expected = _reference(q, *case[1:], 0.125)
    got = kernels.paged_decode_attention(q, *case[1:], 0.125)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- element-wise kernels ------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("rows", "inter"), [(1, 16), (5, 37), (64, 1408)])
def test_silu_mul_equals_pytorch(rows, inter, split):
    gen = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 2 * inter + 3, generator=gen) * 8  # large |x|: both sigmoid branches
    gate_up = wide[:, : 2 * inter]  # rows strided, as a view into a wider buffer
    with torch_threads(2), pytest.MonkeyPatch.context() as mp:
        if split:
            mp.setattr(kernels, "MIN_FLOATS_PER_THREAD", 1)
        got = kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("rows", "dim"), [(1, 8), (3, 61), (40, 512)])
def test_rms_norm_equals_pytorch(rows, dim, with_residual, split):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(rows, dim, generator=gen)
    residual = torch.randn(rows, dim, generator=gen) if with_residual else None
    weight = torch.randn(dim, generator=gen)
    stream = x + residual if with_residual else x
    expected = weight * (stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + 1e-6))
    got_x = x.clone()
    with torch_threads(2), pytest.MonkeyPatch.context() as mp:
        if split:
            mp.setattr(kernels, "MIN_FLOATS_PER_THREAD", 1)
        got = kernels.rms_norm(got_x, weight, 1e-6, residual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, stream)  # the residual stream, updated in place


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("rows", "heads", "head_dim"), [(1, 3, 16), (7, 12, 64), (33, 2, 20)])
def test_rope_equals_pytorch(rows, heads, head_dim, split):
    from pdserve.model.llama import apply_rope

    gen = torch.Generator().manual_seed(heads)
    buffer = torch.randn(rows, (heads + 2) * head_dim, generator=gen)
    x = buffer[:, : heads * head_dim].view(rows, heads, head_dim)  # strided rows, like q/k
    angles = torch.rand(rows, 1, head_dim // 2, generator=gen) * 6
    tables = (angles.cos(), angles.sin())
    x1, x2 = x.chunk(2, dim=-1)
    expected = torch.cat((x1 * tables[0] - x2 * tables[1], x2 * tables[0] + x1 * tables[1]), -1)
    untouched = buffer[:, heads * head_dim :].clone()
    with torch_threads(2), pytest.MonkeyPatch.context() as mp:
        if split:
            mp.setattr(kernels, "MIN_FLOATS_PER_THREAD", 1)
        got = apply_rope(x, tables)
    assert got.data_ptr() == x.data_ptr()  # in place
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(buffer[:, heads * head_dim :], untouched)  # v columns not touched


def test_kernel_reads_a_strided_query_as_its_contiguous_copy():
    """q straight from a view of the fused q/k/v output (rows wider than H x D)."""
    q, k_cache, v_cache, tables, lens = _random_case(4, 8, 2, 64, 16)
    wide = torch.randn(4, 12, 64)
    wide[:, :8] = q
    strided = wide[:, :8]
    assert not strided.is_contiguous()
    got = kernels.paged_decode_attention(strided, k_cache, v_cache, tables, lens, 0.125)
    assert torch.equal(
        got, kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    )


def test_write_kv_equals_index_copy_and_checks_the_slots():
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(5, 16, 8, generator=gen)  # k and v: strided views, as in the model
    k, v = qkv[:, 8:12], qkv[:, 12:]
    slots = torch.tensor([3, 17, 0, 63, 40])
    caches = [torch.zeros(4, 16, 4, 8) for _ in range(4)]
    assert kernels.write_kv(k, v, caches[0], caches[1], slots)
    caches[2].view(-1, 4, 8).index_copy_(0, slots, k)
    caches[3].view(-1, 4, 8).index_copy_(0, slots, v)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(IndexError):
        kernels.write_kv(k, v, caches[0], caches[1], torch.tensor([0, 1, 2, 3, 64]))
