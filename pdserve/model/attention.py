"""Attention over a paged KV cache.

The KV pool of one layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`
(keys and values). A sequence's context lives in the blocks its block table lists, in order;
token `t` of a sequence sits in block `block_table[t // block_size]` at offset
`t % block_size`. The runner flattens every scheduled token of a step into one batch and
describes it with `AttentionMetadata`:

- the first `num_decode_tokens` tokens are single-token decodes, one per sequence; they are
  attended in one batched call over their gathered block tables;
- the rest are prefill spans (a whole prompt, or one chunk of it), attended one span at a
  time with a causal mask offset by the context already in the cache.

The last layer attends for the sampled rows only (`output_rows`, see
`LlamaForCausalLM.forward`): once every key and value of the step is in the cache, a
prompt's last token attends like a decode, so these rows go through the decode path.

NOTE: every slot of the pool must hold finite numbers, including slots past a sequence's
length that a block table's padding points at: masked-out positions get zero weight, and
0 * NaN would still poison the output. The pool is therefore allocated with zeros.

Single-token rows use a C kernel that reads keys and values straight from the pool when
one is available (CPU, float32 queries; see `kernels/`), else gather + PyTorch SDPA. Masks
are built once per step and shared by every layer.

The pool's dtype may be narrower than the activations' (a 16-bit model on CPU computes in
float32 over a bfloat16/float16 pool, see `LlamaForCausalLM.finish_loading`): keys and values
are rounded to the pool's dtype when written, and every attention, prefill included, sees
exactly those rounded values, widened back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pdserve.model import kernels


@dataclass(slots=True)
class PrefillSpan:
    start: int  # index of the span's first token in the flattened batch
    query_len: int  # tokens computed in this step
    context_len: int  # tokens in the cache after this step (cached prefix + query)
    block_table: torch.Tensor  # [num_blocks_of_seq] int64
    mask: torch.Tensor | None = None  # [query_len, context_len] bool; None → plain causal

    @property
    def is_fresh(self) -> bool:
        """True when nothing of this sequence was in the cache before this step."""
        return self.context_len == self.query_len


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: pool slot where each new token's KV goes
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int64
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int64
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Built on first use by the PyTorch decode path, then shared by every layer.
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_blocks*block_size]
    # The rows whose output is kept past the last layer's attention when that is not every
    # row (None: every row): their index in the batch, block table and context length.
    output_rows: torch.Tensor | None = None  # [S] int64
    output_block_tables: torch.Tensor | None = None  # [S, max_blocks] int64
    output_context_lens: torch.Tensor | None = None  # [S] int64

    def get_decode_mask(self, block_size: int) -> torch.Tensor:
        if self.decode_mask is None:
            self.decode_mask = _length_mask(
                self.decode_block_tables, self.decode_context_lens, block_size
            )
        return self.decode_mask


def _length_mask(tables: torch.Tensor, lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """[S, 1, 1, max_blocks*block_size] bool: key j of row s is within its context."""
    keys = torch.arange(tables.shape[1] * block_size, device=lens.device)
    return (keys.unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, B, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    if kernels.reads_kv(k, k_cache) and kernels.write_kv(k, v, k_cache, v_cache, slot_mapping):
        return
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D] keys of this step's tokens (already in the cache too)
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, B, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:  # [T, H, D]
    num_decodes = meta.num_decode_tokens
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    if num_decodes == q.shape[0]:  # a pure decode step: no copy into a shared output
        return _decode_attention(q, k_cache, v_cache, tables, lens, meta.get_decode_mask)
    out = torch.empty_like(q)
    if num_decodes:
        out[:num_decodes] = _decode_attention(
            q[:num_decodes], k_cache, v_cache, tables, lens, meta.get_decode_mask
        )
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.query_len)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, span)
    return out


def paged_attention_output_rows(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [N, B, Hkv, D], this step's keys and values already written
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:  # [len(meta.output_rows), H, D]
    """Attention for `meta.output_rows` only, each over its whole context in the cache."""
    rows = meta.output_rows
    if not len(rows):
        return q.new_empty((0, *q.shape[1:]))
    tables, lens = meta.output_block_tables, meta.output_context_lens
    return _decode_attention(
        q.index_select(0, rows),
        k_cache,
        v_cache,
        tables,
        lens,
        lambda block_size: _length_mask(tables, lens, block_size),
    )


def _decode_attention(q, k_cache, v_cache, tables, lens, get_mask) -> torch.Tensor:
    """One query row per sequence over its `lens` tokens; `get_mask(block_size)` gives the
    PyTorch path's length mask."""
    if kernels.reads_kv(q, k_cache):
        return kernels.paged_decode_attention(  # q may be a strided view of q/k/v
            q, k_cache, v_cache, tables, lens, q.shape[-1] ** -0.5
        )
    return _decode_attention_torch(q, k_cache, v_cache, tables, get_mask)


def _decode_attention_torch(q, k_cache, v_cache, tables, get_mask) -> torch.Tensor:
    num_seqs, max_blocks = tables.shape  # [S, M]
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    length = max_blocks * block_size
    # [S, M, B, Hkv, D] -> [S, Hkv, M*B, D]
    flat_tables = tables.view(-1)
    keys = k_cache.index_select(0, flat_tables).view(num_seqs, length, num_kv_heads, head_dim)
    values = v_cache.index_select(0, flat_tables).view(num_seqs, length, num_kv_heads, head_dim)
    keys, values = keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype)
    query = q.unsqueeze(2)  # [S, H, 1, D]
    mask = get_mask(block_size)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    return out.squeeze(2)


def _prefill_attention(q, k, v, k_cache, v_cache, span: PrefillSpan) -> torch.Tensor:
    query = q.transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
    if span.is_fresh:
        # The whole context is this step's tokens: no need to read the cache back (only to
        # round them as the pool stores them, when it is narrower).
        keys = k.to(k_cache.dtype).to(q.dtype).transpose(0, 1).unsqueeze(0)
        values = v.to(v_cache.dtype).to(q.dtype).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
    else:
        keys = _gather_context(k_cache, span).to(q.dtype)
        values = _gather_context(v_cache, span).to(q.dtype)
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=span.mask, enable_gqa=True
        )
    return out.squeeze(0).transpose(0, 1)  # [Q, H, D]


def _gather_context(cache: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    num_kv_heads, head_dim = cache.shape[2:]
    flat = cache.index_select(0, span.block_table).view(-1, num_kv_heads, head_dim)
    flat = flat[: span.context_len]
    return flat.transpose(0, 1).unsqueeze(0)  # [1, Hkv, C, D]


def causal_mask_with_context(query_len: int, context_len: int, device) -> torch.Tensor:
    """[query_len, context_len] bool: query i (absolute position context_len - query_len + i)
    sees every key at or before its own position."""
    offset = context_len - query_len
    rows = torch.arange(query_len, device=device).unsqueeze(1) + offset
    cols = torch.arange(context_len, device=device).unsqueeze(0)
    return cols <= rows
