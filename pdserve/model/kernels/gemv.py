"""Binding of the small-batch decode product (`gemv.c`), built into the main kernel library
so it runs on the same C thread pool as decode attention.

`PackedGemv.prepare(weight)` packs a `[out, in]` weight (float32, bfloat16 or float16) once
at load time; `packed(x)` is `x @ W.T (+ bias)` for CPU `x` `[M, in]` in float32, bfloat16
or float16, returned in x's dtype, with float32 sums. It streams the weights once per call
whatever M is, so it is meant for decode-sized M (see `cpu_blas` for where it is used).

`build(extra_flags)` gives tests and benchmarks the library another CPU would get (e.g.
`-mno-avx512f`: the AVX2 code on an AVX-512 host).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pdserve.model import kernels

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gemv_panel_width.restype = i64
    lib.gemv_panel_width.argtypes = []
    lib.gemv_has_dpbf16.restype = i64
    lib.gemv_has_dpbf16.argtypes = []
    lib.gemv_vector_floats.restype = i64
    lib.gemv_vector_floats.argtypes = []
    lib.gemv_set_chunk_bytes.restype = i64
    lib.gemv_set_chunk_bytes.argtypes = [i64]
    lib.gemv_pack.restype = None
    lib.gemv_pack.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr]
    lib.gemv.restype = ctypes.c_int
    lib.gemv.argtypes = [ptr] * 4 + [i64] * 5 + [ctypes.c_int] * 2 + [i64]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The main kernel library (None when kernels are unavailable)."""
    lib = kernels._library()
    return None if lib is None else _bind(lib)


@functools.cache
def build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The kernel library compiled with `extra_flags` added (cached like the main one)."""
    flags = kernels.CFLAGS + kernels.isa_flags() + list(extra_flags)
    path = kernels._build(cflags=flags)
    return None if path is None else _bind(ctypes.CDLL(str(path)))


def is_available() -> bool:
    return library() is not None


def supports(dtype: torch.dtype) -> bool:
    return dtype in DTYPE_CODES


def has_native_bf16(lib: ctypes.CDLL | None = None) -> bool:
    """True when bf16 x bf16 products use the CPU's bf16 dot-product instruction."""
    lib = lib or library()
    return bool(lib is not None and lib.gemv_has_dpbf16())


def vector_floats(lib: ctypes.CDLL | None = None) -> int:
    """Floats per vector of the kernel's inner loop: 16 with AVX-512, 8 with AVX2."""
    lib = lib or library()
    return int(lib.gemv_vector_floats()) if lib is not None else 0


def set_chunk_bytes(num_bytes: int, lib: ctypes.CDLL | None = None) -> int:
    """Weight bytes per chunk of a product's work (0, the default: four chunks per
    thread); returns the previous value. The same bits either way: for benchmarks."""
    lib = lib or library()
    return int(lib.gemv_set_chunk_bytes(num_bytes)) if lib is not None else 0


def _threads() -> int:
    return kernels._num_threads or torch.get_num_threads()


class PackedGemv:
    """A `[out, in]` weight packed into `gemv.c`'s panels, in its own dtype."""

    __slots__ = ("in_features", "kernel", "lib", "out_features", "packed", "wtype")

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int, lib) -> None:
        self.packed = packed  # [ceil(out / 16), in rounded up to even, 16]
        self.out_features = out_features
        self.in_features = in_features
        self.lib = lib
        self.kernel = lib.gemv  # looked up once: a decode step makes ~33 calls
        self.wtype = DTYPE_CODES[packed.dtype]

    @classmethod
    def prepare(cls, weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> PackedGemv:
        lib = lib or library()
        if lib is None:
            raise RuntimeError("the gemv kernel is not available")
        out_features, in_features = weight.shape
        if weight.stride(1) != 1:
            weight = weight.contiguous()
        panel = lib.gemv_panel_width()
        shape = (-(-out_features // panel), in_features + in_features % 2, panel)
        packed = torch.empty(shape, dtype=weight.dtype)
        lib.gemv_pack(
            weight.data_ptr(),
            out_features,
            in_features,
            weight.stride(0),
            DTYPE_CODES[weight.dtype],
            packed.data_ptr(),
        )
        return cls(packed, out_features, in_features, lib)

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T (+ bias)`: x `[M, in]` on CPU (columns contiguous) -> `[M, out]`."""
        if x.dim() != 2 or x.stride(-1) != 1:
            x = x.reshape(-1, self.in_features).contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features, dtype=x.dtype)
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        failed = self.kernel(
            x.data_ptr(),
            self.packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            rows,
            self.out_features,
            self.in_features,
            x.stride(0),
            self.out_features,
            self.wtype,
            DTYPE_CODES[x.dtype],
            _threads(),
        )
        if failed:
            raise MemoryError("gemv kernel could not allocate its scratch buffer")
        return y
