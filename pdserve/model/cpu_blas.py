"""float32 matrix products on CPU: oneDNN with prepacked weights, OpenBLAS for single rows.

Why not plain `F.linear`: torch's CPU wheel sends float32 products to MKL, which takes a slow
generic path on AMD processors. Measured on these machines (AMD EPYC Zen 4, 2 threads,
weights of the built-in model's sizes, `benchmarks/` and docs/benchmarks.md):

- several rows (a decode batch, a prefill chunk): oneDNN on a weight reordered once into
  its blocked layout (`torch.ops.mkldnn`, the path `torch.compile` uses on CPU) runs at
  ~200 GFLOPS from 8 rows up, 1.5-2x OpenBLAS and 2x MKL at 8-32 rows; it also beats
  OpenBLAS when OpenBLAS falls to ~14 GB/s at 2-4 rows;
- one row (a single decode stream): OpenBLAS's GEMV on a row-major `[in, out]` copy streams
  the weights at ~45 GB/s, 1.6x oneDNN.

Backends, chosen with `PDSERVE_CPU_BLAS`:
- `auto` (default): oneDNN for two rows and more, OpenBLAS for one row. That keeps two
  copies of every weight matrix, so `auto` does it only while the matrices take at most
  1/8 of physical memory, and falls back to `onednn` above that;
- `onednn`: the packed weights only (one copy: the dense weights are released);
- `openblas`: OpenBLAS up to `MAX_ROWS` rows, torch above (the previous default);
- `torch`: plain `F.linear` everywhere;
- `invariant` (chosen by `EngineConfig.batch_invariant`, not by the variable): the
  batch-invariant product of `kernels/gemm.c` for every row count, whose rows do not
  depend on the batch they are in (one copy of the weights, packed).
GPUs, bfloat16 and float16 always stay on torch.

Threads: oneDNN runs on torch's OpenMP threads; OpenBLAS keeps its own pool, sized with
`threadpoolctl` to the engine's thread count. The model runner gives torch one thread on
steps whose products all go to OpenBLAS (see `ModelRunner._assign_threads`).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from pdserve.errors import ConfigError
from pdserve.model.kernels import invariant as invariant_kernels

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onednn", "openblas", "torch")
# `openblas` backend: above this many rows (prefill-sized products) torch's own path was as
# fast or faster in the whole model, so only decode-sized products go through OpenBLAS.
MAX_ROWS = 64
# `auto` keeps a second copy of the weights while all of them take at most this share of RAM.
AUTO_SECOND_COPY_RAM_FRACTION = 1 / 8


def backend() -> str:
    name = os.environ.get("PDSERVE_CPU_BLAS", "auto") or "auto"
    if name not in BACKENDS:
        raise ConfigError("PDSERVE_CPU_BLAS", f"{name!r} is not one of {', '.join(BACKENDS)}")
    return name


def is_enabled_for(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and backend() != "torch"


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def resolve_backend(weight_bytes: int) -> str:
    """The backend a model with `weight_bytes` of float32 matrices gets on this machine."""
    name = backend()
    if name in ("auto", "onednn") and not onednn_available():
        logger.warning("oneDNN is not available in this torch build: using OpenBLAS")
        return "openblas"
    if name == "auto" and weight_bytes > physical_memory_bytes() * AUTO_SECOND_COPY_RAM_FRACTION:
        logger.info(
            "weights take %.1f GiB: keeping one (oneDNN) copy, single-row products a "
            "little slower (PDSERVE_CPU_BLAS=auto keeps a second copy only below 1/8 of RAM)",
            weight_bytes / 2**30,
        )
        return "onednn"
    return name


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


class CpuMatmul:
    """`x @ W.T (+ b)` for one `[out, in]` weight through the backend chosen for the model.

    Build with `prepare`, which may re-lay the parameter out in memory (or release it, for
    `onednn`): afterwards go through this object, not through `F.linear` on the parameter.
    """

    __slots__ = ("invariant", "max_blas_rows", "packed", "rows_major")

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None  # oneDNN blocked layout
        self.rows_major: np.ndarray | None = None  # `[in, out]` row-major, for OpenBLAS
        self.max_blas_rows = 0  # products with at most this many rows go to OpenBLAS
        self.invariant: invariant_kernels.PackedLinear | None = None  # `invariant` backend

    @classmethod
    def prepare(cls, param: torch.nn.Parameter, backend_name: str, keep_dense: bool):
        """`keep_dense`: the parameter's values are still needed (e.g. a tied embedding)."""
        mm = cls()
        if backend_name == "invariant":
            mm.invariant = invariant_kernels.PackedLinear.prepare(param.detach())
            if not keep_dense:
                param.data = torch.empty(0, dtype=param.dtype)  # as for `onednn` below
            return mm
        if backend_name in ("auto", "onednn"):
            mm.packed = torch.ops.mkldnn._reorder_linear_weight(param.detach(), None)
        if backend_name in ("auto", "openblas"):
            mm.max_blas_rows = 1 if backend_name == "auto" else MAX_ROWS
            if keep_dense:
                mm.rows_major = param.detach().numpy().T  # a view: BLAS handles the stride
            else:
                mm.rows_major = transpose_in_place(param)
        elif not keep_dense:
            # `onednn`: the packed copy is the only one; an empty parameter fails loudly
            # if anything still reaches for the dense values.
            param.data = torch.empty(0, dtype=param.dtype)
        return mm

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """The product, or None when torch should compute it (`openblas` above MAX_ROWS)."""
        if self.invariant is not None:
            return self.invariant(x, bias)
        rows = x.shape[0]
        if rows <= self.max_blas_rows:
            y = torch.from_numpy(x.numpy() @ self.rows_major)
            return y if bias is None else y + bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return None


def transpose_in_place(param: torch.nn.Parameter) -> np.ndarray:
    """Re-lay a `[out, in]` weight out as `[in, out]` row-major and return that array.

    OpenBLAS multiplies a few rows by a row-major `[in, out]` matrix 1.3x-2x faster than
    by the transposed view of `[out, in]` (which it repacks on every call). The parameter
    then views the new buffer as `[out, in]` (non-contiguous), so torch's paths, which
    handle a transposed weight without a copy, see the same values: one copy of the
    weights in memory, not two.
    """
    array = np.ascontiguousarray(param.detach().numpy().T)
    param.data = torch.from_numpy(array).T
    return array


def linear(x: torch.Tensor, weight: torch.Tensor, bias, mm: CpuMatmul | None) -> torch.Tensor:
    if mm is not None:
        y = mm(x, bias)
        if y is not None:
            return y
    return F.linear(x, weight, bias)


def set_num_threads(num_threads: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=num_threads, user_api="blas")
