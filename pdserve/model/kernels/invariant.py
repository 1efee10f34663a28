"""Binding of the batch-invariant kernels: the matrix product (`gemm.c`) on its own thread
pool (`parallel.c`).

These sources are built into a library of their own, with the same flags as the other
kernels except `-fassociative-math`: the product's whole point is one fixed summation order
per output element, which the compiler must not reorder. See `gemm.c` for the contract.

`PackedLinear.prepare(weight)` packs a `[out, in]` float32 weight once at load time;
`packed(x, bias)` is `x @ W.T + bias` for CPU float32 `x` `[M, in]`, each row bitwise
independent of M and of the other rows.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from pdserve.model import kernels

logger = logging.getLogger(__name__)

SOURCES = [kernels.SOURCES[0].with_name(n) for n in ("gemm.c", "parallel.c")]
HEADERS = [kernels.SOURCES[0].with_name("parallel.h")]
CFLAGS = [f for f in kernels.CFLAGS if f != "-fassociative-math"]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("PDSERVE_DISABLE_KERNELS", "") not in ("", "0"):
        return None
    return build()


def build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile (or find in the cache) and load the library; `extra_flags` let tests build
    the variant another CPU would get (e.g. `-mno-avx512f`: the AVX2 tiles)."""
    try:
        path = kernels._build("pdserve_invariant", SOURCES, HEADERS, CFLAGS + list(extra_flags))
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        logger.warning("cannot load the batch-invariant kernels (%s)", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gemm_panel_width.restype = i64
    lib.gemm_panel_width.argtypes = []
    lib.gemm_pack_f32.restype = None
    lib.gemm_pack_f32.argtypes = [ptr, i64, i64, i64, ptr]
    lib.gemm_f32.restype = None
    lib.gemm_f32.argtypes = [ptr] * 4 + [i64] * 6
    return lib


def is_available() -> bool:
    return _library() is not None and kernels.is_available()


def _threads() -> int:
    return kernels._num_threads or torch.get_num_threads()


class PackedLinear:
    """A `[out, in]` float32 weight packed into `gemm.c`'s panels."""

    __slots__ = ("in_features", "out_features", "packed")

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int) -> None:
        self.packed = packed  # [ceil(out / PANEL), in, PANEL]
        self.out_features = out_features
        self.in_features = in_features

    @classmethod
    def prepare(cls, weight: torch.Tensor) -> PackedLinear:
        lib = _library()
        if lib is None:
            raise RuntimeError("the batch-invariant kernels are not available")
        out_features, in_features = weight.shape
        if weight.stride(1) != 1:
            weight = weight.contiguous()
        panel = lib.gemm_panel_width()
        packed = torch.empty(-(-out_features // panel), in_features, panel)
        lib.gemm_pack_f32(
            weight.data_ptr(), out_features, in_features, weight.stride(0), packed.data_ptr()
        )
        return cls(packed, out_features, in_features)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T (+ bias)`: x `[M, in]` CPU float32 (columns contiguous) -> `[M, out]`."""
        if x.stride(-1) != 1 or x.dim() != 2:
            x = x.reshape(-1, self.in_features).contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features)
        if bias is not None:
            bias = bias.contiguous()
        _library().gemm_f32(
            x.data_ptr(),
            self.packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            rows,
            self.out_features,
            self.in_features,
            x.stride(0),
            self.out_features,
            _threads(),
        )
        return y
