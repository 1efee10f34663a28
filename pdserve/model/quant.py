"""Optional 8-bit weights (`EngineConfig.quantization = "int8"`): weight-only, per group.

Owns the int8 weight format, quantising a loaded model, and the quantised linear layer.

Format (like llama.cpp's Q8_0): each output row of a `[out, in]` weight is cut into groups
of `GROUP_SIZE` consecutive inputs (the last group of a row may be shorter); a group keeps
one float32 scale `s = max|w| / 127` and its weights as `q = round(w / s)` in [-127, 127],
so `|w - q s| <= s / 2` for every weight. Activations stay in floating point: the product
dequantises `q s` on the fly and accumulates in float32. Groups rather than one scale per
row (per channel) because a row's largest weight then spoils only its own 32 neighbours;
float32 scales (not Q8_0's float16) because float16 loses precision for the small scales of
real checkpoints (below ~6e-5 it is subnormal) and costs only 1/16 of the int8 bytes more.

What is quantised: every projection (q/k/v, o, gate/up, down) and the LM head. The token
embedding stays in the model dtype: a step reads only T of its rows. A tied embedding is
therefore kept dense for the lookups while the head uses its own int8 copy.

Where it runs: on CPU through `kernels/gemm_int8.c` when the C kernels are built; elsewhere
(another device, no compiler, `PDSERVE_DISABLE_KERNELS=1`) through the torch fallback,
which dequantises the whole weight for every product and calls `F.linear`: the same maths,
correct on any device, slower than the unquantised model (no int8 GPU kernel exists here).

The quantisation happens once, at load time, from the weights in the model's dtype (the
checkpoint's float32 or bfloat16 values, or the built-in model's), so any checkpoint works.
Lossy: greedy outputs can differ from the unquantised model's (docs/benchmarks.md reports by
how much); `quantization` is never on by default.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config import QUANTIZATIONS
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
QMAX = 127  # symmetric: -128 is never used, so negating a weight negates its code


class Int8Weight(NamedTuple):
    q: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out, ceil(in / group_size)] float32
    group_size: int


def quantize_int8(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int8Weight:
    """Quantise a `[out, in]` weight per row and group of `group_size` inputs."""
    w = _grouped(weight.detach().float(), group_size)  # [out, groups, group_size]
    scales = w.abs().amax(-1) / QMAX  # [out, groups]
    q = torch.round(w / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    q = q.clamp_(-QMAX, QMAX).to(torch.int8).flatten(1)[:, : weight.shape[1]]
    return Int8Weight(q.contiguous(), scales.contiguous(), group_size)


def dequantize_int8(weight: Int8Weight) -> torch.Tensor:
    """The float32 `[out, in]` matrix `q * scale` that the int8 weight stands for."""
    q, scales, group_size = weight
    w = _grouped(q.float(), group_size) * scales.unsqueeze(-1)
    return w.flatten(1)[:, : q.shape[1]]


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[out, in]` -> `[out, groups, group_size]`, the last group zero-padded."""
    rows, cols = w.shape
    pad = -cols % group_size
    return F.pad(w, (0, pad)).view(rows, (cols + pad) // group_size, group_size)


class Int8Linear(nn.Module):
    """Stands in for `llama.Linear` once quantised: y = x dequant(W)^T (+ b)."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.weight = weight
        self.bias = bias

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(quantize_int8(weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int8(self.weight).to(x.dtype)
        return F.linear(x, w, self.bias)


class _HeadProduct:
    """The LM head's product in the model's `lm_head_mm` slot (called `mm(x, bias)` by
    `cpu_blas.linear`, never returning None)."""

    __slots__ = ("linear", "max_blas_rows")

    def __init__(self, linear: Int8Linear) -> None:
        self.linear = linear
        self.max_blas_rows = 0  # products up to this many rows leave torch's threads idle

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x)


def quantize_model(model: nn.Module, method: str) -> None:
    """Replace every `Linear` of a loaded `LlamaForCausalLM` and its LM head by int8
    versions, in place, releasing the dense weights (a tied embedding stays for lookups)."""
    from pdserve.model.llama import Linear  # here: llama imports this module lazily too

    if method not in QUANTIZATIONS:
        raise ConfigError("quantization", f"{method!r}; one of {QUANTIZATIONS}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, Int8Linear.quantize(child.weight, child.bias))
    model.lm_head_mm = _HeadProduct(Int8Linear.quantize(model.lm_head, None))
    if model.lm_head is not model.embed_tokens:
        model.lm_head.data = torch.empty(0, dtype=model.lm_head.dtype)  # fails loudly if used
