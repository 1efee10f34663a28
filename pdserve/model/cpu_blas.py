"""float32 matrix products on CPU through numpy's OpenBLAS instead of torch's MKL.

Why: torch's CPU wheel calls MKL, which takes a slow generic path on AMD processors. On
these machines (AMD EPYC, 2 threads, weights streamed from memory as in a real decode step)
numpy/OpenBLAS computes `x @ W.T` 1.8x faster at batch 1 (27 vs 15 GB/s of weights read),
1.4x at batch 32 and ~5% faster for prefill-sized batches (benchmarks/ measure it). numpy
is already a dependency and shares memory with torch tensors, so a product costs two
zero-copy views and one BLAS call.

Used only for float32 on CPU; everything else (GPUs, bf16, fp16) stays on torch.
`PDSERVE_CPU_BLAS=torch` turns it off. OpenBLAS keeps its own thread pool, sized with
`threadpoolctl` to the engine's thread count.
"""

from __future__ import annotations

import os

import numpy as np
import torch

# Above this many rows (prefill-sized products) torch's own path was as fast or faster in
# the whole model, so only decode-sized products go through OpenBLAS.
MAX_ROWS = 64


def is_enabled_for(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and os.environ.get("PDSERVE_CPU_BLAS", "openblas") != "torch"
    )


def host_view(weight: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a `[out, in]` weight, transposed for `x @ W.T`."""
    return weight.detach().numpy().T


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


def matmul(x: torch.Tensor, weight_t: np.ndarray) -> torch.Tensor:
    """`x @ W.T` for x `[T, in]`; `weight_t` from `host_view`."""
    return torch.from_numpy(x.numpy() @ weight_t)


def set_num_threads(num_threads: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=num_threads, user_api="blas")
