"""Symmetric int8 quantisation of KV blocks, for the wire and the host/disk tiers.

Owns: `quantize` / `dequantize` and the byte arithmetic of the int8 format. The device pool
always stays in the model's dtype (bfloat16/float32); int8 is only how blocks travel
(`tcp` transfer backend, opt-in) and how colder tiers may store them, so attention never
runs on quantised values and no kernel needs an int8 path.

Format. Any tensor shaped `[..., block_size, num_kv_heads, head_dim]` — one block of one
layer's keys (`[B, H, D]`), a per-block slice of the pool across layers (`[L, 2, B, H, D]`),
a batch of blocks (`[L, 2, n, B, H, D]` or `[2, n, B, H, D]`) — is quantised with one
float32 scale per leading index and per head: the scale covers the `block_size` tokens and
`head_dim` channels of one head in one block of one layer's keys or values. So

    x      [..., B, H, D]  bfloat16 | float16 | float32
    q      [..., B, H, D]  int8, q = round(x / scale) in [-127, 127]
    scales [..., H]        float32, scale = max|x| / 127 over the block's (B, D) of a head

and `dequantize(q, scales, dtype) = q * scale`, so each element is off by at most scale/2
(plus the target dtype's own rounding). -128 is never used: the code stays symmetric.
A head whose values are all zero (unwritten slots are zeros) gets scale 1.0, never 0, so
dequantisation never divides by or multiplies with a degenerate value. Non-finite inputs are
not supported (a NaN or inf in the KV means the model is already broken).

Why per (block, head): a head's keys share a scale of similar magnitude across tokens
(RoPE mixes channels but keeps per-head norms), while heads differ by orders of magnitude;
per-block scales keep the format local, so any block can be (de)quantised alone, which is
what a hash-keyed tier and a scattered wire batch need. The overhead is 4 bytes per
`block_size * head_dim` values: 1/(block_size*head_dim/4) of the int8 payload (0.4% for
blocks of 16 tokens and heads of 64).

Everything is vectorised torch on the input's device; no host syncs.
"""

from __future__ import annotations

import torch

QMAX = 127
SCALE_DTYPE = torch.float32
# Reduced over when computing a scale: the block's tokens (-3) and a head's channels (-1).
_BLOCK_DIMS = (-3, -1)


def scales_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """The scales' shape for a KV tensor of `shape` `[..., B, H, D]`: `[..., H]`."""
    if len(shape) < 3:
        raise ValueError(f"KV tensor must be [..., block_size, heads, head_dim], got {shape}")
    return (*shape[:-3], shape[-2])


def quantize(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`kv` `[..., B, H, D]` (float) → `(q [..., B, H, D] int8, scales [..., H] float32)`."""
    scales_shape(kv.shape)  # checks the rank
    x = kv.float()
    scales = x.abs().amax(dim=_BLOCK_DIMS) / QMAX  # [..., H]
    # An all-zero head (or one so small its scale underflows) gets 1.0: q is 0 either way.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    # NOTE: divide by the very scale that is stored (not multiply by a reciprocal), so the
    # round-trip bound |x - q*scale| <= scale/2 holds up to one float32 rounding.
    q = torch.round(x / _expand(scales)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales.to(SCALE_DTYPE)


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q` `[..., B, H, D]` int8 and `scales` `[..., H]` → `[..., B, H, D]` in `dtype`."""
    if q.dtype != torch.int8:
        raise ValueError(f"expected int8 values, got {q.dtype}")
    if tuple(scales.shape) != scales_shape(q.shape):
        raise ValueError(f"scales {tuple(scales.shape)} do not match values {tuple(q.shape)}")
    return (q.float() * _expand(scales.float())).to(dtype)


def dequantize_into(out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """Dequantise into an existing tensor (e.g. a slice of the pool), in `out`'s dtype."""
    out.copy_(dequantize(q, scales, out.dtype))


def _expand(scales: torch.Tensor) -> torch.Tensor:
    """`[..., H]` → `[..., 1, H, 1]`, broadcastable against `[..., B, H, D]`."""
    return scales.unsqueeze(-2).unsqueeze(-1)


def num_bytes(shape: tuple[int, ...] | torch.Size) -> int:
    """Bytes of the int8 form of a KV tensor of `shape`: values plus float32 scales."""
    values = _numel(shape)
    return values + _numel(scales_shape(shape)) * SCALE_DTYPE.itemsize


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
