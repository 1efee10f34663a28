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

import ctypes
import functools
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config import QUANTIZATIONS
from pdserve.errors import ConfigError
from pdserve.model import kernels
from pdserve.model.llama import Linear

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
MAX_DECODE_ROWS = 64
# From this many rows on the kernel dequantises blocks of weights once for all rows instead
# of widening the codes per tile of rows (gemm_int8.c). Measured on a loaded Zen 4 host (all
# 8 layers' products): at 16 rows the tiles took 0.7x the blocked path's time, at 32 the
# same, at 64 and 512 the blocked path was 5-10 % faster.
BLOCKED_MIN_ROWS = 32
# From this many rows on, the whole weight is dequantised for a library GEMM (prefill).
DEQUANTIZED_MIN_ROWS = 1 << 62
QMAX = 127  # symmetric: -128 is never used, so negating a weight negates its code


class Int8Weight(NamedTuple):
    q: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out, ceil(in / group_size)] float32
    group_size: int


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> Int8Weight:
    """Quantise a `[out, in]` weight per row and group of `group_size` inputs (default
    `GROUP_SIZE`; one as large as the row, or larger, gives one scale per row)."""
    group_size = min(group_size or GROUP_SIZE, weight.shape[1])
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


# ---- the C kernel (kernels/gemm_int8.c) ------------------------------------------------------


def bind(lib: ctypes.CDLL | None) -> ctypes.CDLL | None:
    """Declare the int8 product's C signatures on a kernels library (None stays None)."""
    if lib is None or not hasattr(lib, "gemm_q8_f32"):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gemm_q8_panel_width.restype = i64
    lib.gemm_q8_panel_width.argtypes = []
    lib.gemm_q8_pack.restype = None
    lib.gemm_q8_pack.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr]
    lib.gemm_q8_dequantize.restype = None
    lib.gemm_q8_dequantize.argtypes = [ptr, ptr, i64, i64, i64, ptr]
    lib.gemm_q8_f32.restype = None
    lib.gemm_q8_f32.argtypes = [ptr] * 5 + [i64] * 8
    return lib


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    return bind(kernels._library())


def build_variant(extra_flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """The kernel as another CPU would get it (tests: `("-mno-avx512f",)`, the AVX2 tiles)."""
    sources = [kernels.SOURCES[0].with_name(n) for n in ("gemm_int8.c", "parallel.c")]
    flags = kernels.CFLAGS + list(extra_flags)
    path = kernels._build("pdserve_q8_variant", sources, kernels.HEADERS, flags)
    return bind(ctypes.CDLL(str(path))) if path is not None else None


class PackedInt8:
    """An `Int8Weight` re-laid out in `gemm_int8.c`'s panels, and the product over it."""

    __slots__ = ("codes", "group_size", "in_features", "lib", "out_features", "scales")

    def __init__(self, weight: Int8Weight, lib: ctypes.CDLL) -> None:
        q, scales, self.group_size = weight
        self.out_features, self.in_features = q.shape
        self.lib = lib
        panel = lib.gemm_q8_panel_width()
        num_panels, groups = -(-self.out_features // panel), scales.shape[1]
        self.codes = torch.empty(num_panels, self.in_features, panel, dtype=torch.int8)
        self.scales = torch.empty(num_panels, groups, panel)
        q, scales = q.contiguous(), scales.contiguous()
        lib.gemm_q8_pack(
            q.data_ptr(),
            scales.data_ptr(),
            self.out_features,
            self.in_features,
            q.stride(0),
            groups,
            self.codes.data_ptr(),
            self.scales.data_ptr(),
        )

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ dequant(W).T (+ bias)`: x `[M, in]` float32 on CPU -> `[M, out]`."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows = x.shape[0]
        if rows >= DEQUANTIZED_MIN_ROWS:
            return self._dequantized_product(x, bias)
        y = torch.empty(rows, self.out_features)
        if bias is not None:
            bias = bias.float().contiguous()
        self.lib.gemm_q8_f32(
            x.data_ptr(),
            self.codes.data_ptr(),
            self.scales.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            rows,
            self.out_features,
            self.in_features,
            self.group_size,
            x.stride(0),
            self.out_features,
            kernels._num_threads or torch.get_num_threads(),
            BLOCKED_MIN_ROWS,
        )
        return y

    def _dequantized_product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Prefill-sized products: dequantise the whole weight (a few ms, paid once for
        hundreds of rows) and let OpenBLAS's GEMM, tuned for many rows, do the rest."""
        w = torch.empty(self.in_features, self.out_features)  # [in, out]: W transposed
        self.lib.gemm_q8_dequantize(
            self.codes.data_ptr(),
            self.scales.data_ptr(),
            self.out_features,
            self.in_features,
            self.group_size,
            w.data_ptr(),
        )
        y = torch.from_numpy(x.numpy() @ w.numpy())
        return y if bias is None else y.add_(bias)


# ---- the layer -------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """Stands in for `llama.Linear` once quantised: y = x dequant(W)^T (+ b).

    On CPU with the kernel, only the packed copy is kept; otherwise the `[out, in]` codes
    and the torch fallback."""

    def __init__(
        self, weight: Int8Weight, bias: torch.Tensor | None, lib: ctypes.CDLL | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.bias = bias
        on_cpu = weight.q.device.type == "cpu"
        self.packed = PackedInt8(weight, lib) if on_cpu and lib is not None else None
        self.weight = weight if self.packed is None else None

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, lib: ctypes.CDLL | None = None
    ) -> Int8Linear:
        return cls(quantize_int8(weight), bias, lib)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            w = dequantize_int8(self.weight).to(x.dtype)
            return F.linear(x, w, self.bias)
        lead = x.shape[:-1]
        y = self.packed(x.reshape(-1, self.in_features).float(), self.bias)
        return y.view(*lead, self.out_features).to(x.dtype)


class _HeadProduct:
    """The LM head's product in the model's `lm_head_mm` slot (called `mm(x, bias)` by
    `cpu_blas.linear`, never returning None)."""

    __slots__ = ("linear", "max_blas_rows")

    def __init__(self, linear: Int8Linear) -> None:
        self.linear = linear
        # The runner gives torch one thread on steps of at most this many tokens (see
        # `ModelRunner._assign_threads`): every int8 product runs on the kernels' own pool,
        # so decode steps leave torch's threads nothing to do but wait on the same cores.
        self.max_blas_rows = MAX_DECODE_ROWS if linear.packed is not None else 0

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x)


def quantize_model(model: nn.Module, method: str) -> None:
    """Replace every `Linear` of a loaded `LlamaForCausalLM` and its LM head by int8
    versions, in place, releasing the dense weights (a tied embedding stays for lookups)."""
    if method not in QUANTIZATIONS:
        raise ConfigError("quantization", f"{method!r}; one of {QUANTIZATIONS}")
    lib = _kernel() if model.lm_head.device.type == "cpu" else None
    if model.lm_head.device.type == "cpu" and lib is None:
        logger.warning("int8 weights without the C kernels: torch fallback (slow)")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, Int8Linear.quantize(child.weight, child.bias, lib))
    model.lm_head_mm = _HeadProduct(Int8Linear.quantize(model.lm_head, None, lib))
    if model.lm_head is not model.embed_tokens:
        model.lm_head.data = torch.empty(0, dtype=model.lm_head.dtype)  # fails loudly if used
