"""Matrix products on CPU: one place that decides which code multiplies a weight.

Why not plain `F.linear`: torch's CPU wheel sends float32 products to MKL, which takes a slow
generic path on AMD processors, and 16-bit products on CPUs without bf16 instructions to an
emulated GEMM several times slower than float32. Measured on these machines (AMD EPYC Zen 3
and Zen 4, 2 threads, the built-in model's weights, `benchmarks/cpu_gemm.py`, see
docs/benchmarks.md):

- decode-sized products (1 to `GEMV_MAX_ROWS` rows): the C kernel `kernels/gemv.c` streams
  each weight once, split over the cores by output columns, and converts 16-bit weights in
  registers: a bfloat16/float16 model reads half the bytes of a float32 one;
- several rows (larger decode batches, prefill chunks): oneDNN on a weight reordered once
  into its blocked layout (`torch.ops.mkldnn`, the path `torch.compile` uses on CPU) runs at
  ~200 GFLOPS from 8 rows up, 1.5-2x OpenBLAS and 2x MKL at 8-32 rows. 16-bit weights stay
  on the kernel up to `HALF_GEMV_MAX_ROWS` rows (16 in an AVX2 build; decode batches: it
  reads half the bytes and widens them in registers) and get to oneDNN above as a float32
  copy.

A 16-bit model on CPU computes in float32 (see `LlamaForCausalLM.finish_loading`): x is
float32 on every path, so the product is the float32 product on the 16-bit-rounded weights
whichever code runs it. (torch's native bf16 GEMM would round x to bf16 as well: faster
prefill on CPUs with bf16 instructions, but other maths; not used.)

Backends, chosen with `PDSERVE_CPU_BLAS`:
- `auto` (default): the gemv kernel up to `GEMV_MAX_ROWS` rows, oneDNN above. That keeps
  two copies of every matrix, so `auto` does it only while the weights take at most 1/8 of
  physical memory, and falls back to `onednn` above that (16-bit: the kernel for every row
  count instead of a float32 copy). Without the C kernels it acts as `onednn-openblas`;
- `onednn-openblas`: the default before the gemv kernel: oneDNN for two rows and more,
  OpenBLAS's GEMV on a row-major `[in, out]` copy for one row (float32 only);
- `onednn`: the packed weights only (one copy: the dense weights are released);
- `openblas`: OpenBLAS up to `MAX_ROWS` rows, torch above;
- `torch`: plain `F.linear` everywhere;
- `invariant` (chosen by `EngineConfig.batch_invariant`, not by the variable): the
  batch-invariant product of `kernels/gemm.c` for every row count, whose rows do not
  depend on the batch they are in (one copy of the weights, packed). The gemv kernel is not
  batch-invariant (its summation order depends on the row count), so this mode never uses it.
Only `auto` handles 16-bit weights; the other backends leave them to torch. GPUs always stay
on torch.

Row buckets (`bucket_rows`): oneDNN builds and caches a primitive per product shape (up to
1024 of them), and one for a prefill-sized product holds megabytes; a prefill worker sees a
new row count with almost every step, so its heap grew through a whole soak (measured, see
docs/benchmarks.md "Soak"). Capping the cache instead rebuilt decode-sized primitives every
step (4.5x slower products). So products of more than `BUCKET_EXACT_BELOW` rows that go to
oneDNN (or to torch's own CPU path) are padded with zero rows up to the next bucket, eight
per doubling (at most 12.5 % extra rows, ~6 % on average), and the padding is sliced off
the result. Rows of a product are independent, and the padding never leaves the product:
attention, the KV pool and sampling see only the real rows. Only the set of shapes that
reach the library is bounded (~60 up to 2048 rows). `PDSERVE_PAD_ROWS=0` turns it off.

Threads: the gemv kernel runs on the C kernels' pool and oneDNN on torch's OpenMP threads;
OpenBLAS keeps its own pool, sized with `threadpoolctl` to the engine's thread count. The
model runner gives torch one thread on steps whose products all avoid torch's threads
(`CpuMatmul.max_blas_rows`, see `ModelRunner._assign_threads`).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from pdserve.errors import ConfigError
from pdserve.model.kernels import gemv
from pdserve.model.kernels import invariant as invariant_kernels

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onednn-openblas", "onednn", "openblas", "torch")
# `openblas` backend: above this many rows (prefill-sized products) torch's own path was as
# fast or faster in the whole model, so only decode-sized products go through OpenBLAS.
MAX_ROWS = 64
# `auto`: products of at most this many rows go to the gemv kernel (measured crossover with
# oneDNN on float32 weights; 16-bit weights: see `gemv_max_rows`).
GEMV_MAX_ROWS = 8
# ... for 16-bit weights, whose float32 alternative (oneDNN) reads twice the bytes. Measured
# (benchmarks/cpu_gemm.py --threads 1 --cpu-time, Zen 4; every product of a step), kernel on
# bf16 weights vs oneDNN float32 at 16 / 32 / 64 rows: AVX-512 13.8 / 28.4 / 50.4 vs
# 21.0 / 29.9 / 55.0 ms; the AVX2 build vs oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2)
# 23.5 / 48.5 / 89.7 vs 24.0 / 48.7 / 65.3 ms: level up to 32 rows, behind above. In the
# locked decode run (docs/benchmarks.md) the AVX2 build's bf16 step at batch 32 came out
# 0.95x float32's (which had AVX-512 oneDNN there), so an AVX2 build keeps only up to 16
# rows: above, 16-bit weights take oneDNN like float32 ones and never fall behind them.
HALF_GEMV_MAX_ROWS = 32
HALF_GEMV_MAX_ROWS_AVX2 = 16
# `auto` keeps a second copy of the weights while all of them take at most this share of RAM.
AUTO_SECOND_COPY_RAM_FRACTION = 1 / 8
HALF_DTYPES = (torch.bfloat16, torch.float16)
# Row buckets: counts below this are used as they are (decode batches: a few dozen shapes at
# most); above, `2**BUCKETS_PER_OCTAVE_LOG2` buckets per doubling.
BUCKET_EXACT_BELOW = 16
BUCKETS_PER_OCTAVE_LOG2 = 3


def backend() -> str:
    name = os.environ.get("PDSERVE_CPU_BLAS", "auto") or "auto"
    if name not in BACKENDS:
        raise ConfigError("PDSERVE_CPU_BLAS", f"{name!r} is not one of {', '.join(BACKENDS)}")
    return name


def is_enabled_for(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or backend() == "torch":
        return False
    if weight.dtype in HALF_DTYPES:
        return backend() == "auto" and gemv.is_available()
    return weight.dtype == torch.float32


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def resolve_backend(weight_bytes: int, dtype: torch.dtype = torch.float32) -> str:
    """The backend a model with `weight_bytes` of matrices in `dtype` gets on this machine."""
    name = backend()
    if name == "auto" and not gemv.is_available():
        name = "onednn-openblas"
    if name in ("auto", "onednn", "onednn-openblas") and not onednn_available():
        logger.warning("oneDNN is not available in this torch build: using OpenBLAS")
        return "openblas"
    second_copy = weight_bytes * (2 if dtype in HALF_DTYPES else 1)  # float32 copy: 2x
    too_big = second_copy > physical_memory_bytes() * AUTO_SECOND_COPY_RAM_FRACTION
    if name in ("auto", "onednn-openblas") and too_big:
        logger.info(
            "weights take %.1f GiB: keeping one copy, single-row products a little slower "
            "(PDSERVE_CPU_BLAS=auto keeps a second copy only below 1/8 of RAM)",
            weight_bytes / 2**30,
        )
        return "auto-one-copy" if name == "auto" and dtype in HALF_DTYPES else "onednn"
    return name


def bucket_rows(rows: int) -> int:
    """The row count a product of `rows` rows runs at: `rows` rounded up to a multiple of
    2**(floor(log2 rows) - 3), so 16, 18, ..., 30, 32, 36, ..., 60, 64, 72, ... (see above)."""
    if rows < BUCKET_EXACT_BELOW:
        return rows
    step = 1 << (rows.bit_length() - 1 - BUCKETS_PER_OCTAVE_LOG2)
    return -(-rows // step) * step


def pads_rows() -> bool:
    return os.environ.get("PDSERVE_PAD_ROWS", "1") != "0"


def padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` `[M, K]` with zero rows appended up to `[rows, K]`."""
    out = x.new_empty((rows, x.shape[1]))
    out[: x.shape[0]].copy_(x)
    out[x.shape[0] :].zero_()
    return out


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def gemv_max_rows(dtype: torch.dtype, backend_name: str) -> int:
    """Rows up to which the gemv kernel beats the wide path for weights of `dtype`."""
    if backend_name == "auto-one-copy":
        return 1 << 62  # 16-bit weights, no room for a float32 copy: the kernel does all
    if dtype not in HALF_DTYPES:
        return GEMV_MAX_ROWS
    return HALF_GEMV_MAX_ROWS if gemv.vector_floats() >= 16 else HALF_GEMV_MAX_ROWS_AVX2


class CpuMatmul:
    """`x @ W.T (+ b)` for one `[out, in]` weight through the backend chosen for the model.

    Build with `prepare`, which may re-lay the parameter out in memory (or release it):
    afterwards go through this object, not through `F.linear` on the parameter.
    """

    __slots__ = (
        "invariant",
        "max_blas_rows",
        "max_gemv_rows",
        "packed",
        "pad_rows",
        "rows_major",
        "small",
    )

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None  # oneDNN blocked layout, float32
        self.rows_major: np.ndarray | None = None  # `[in, out]` row-major, for OpenBLAS
        self.small: gemv.PackedGemv | None = None  # gemv.c panels, the weight's dtype
        self.max_gemv_rows = 0  # products with at most this many rows go to `small`
        self.max_blas_rows = 0  # ... at most this many avoid torch's threads (gemv, OpenBLAS)
        self.invariant: invariant_kernels.PackedLinear | None = None  # `invariant` backend
        self.pad_rows = pads_rows()  # bucket the row counts of library products (see above)

    @classmethod
    def prepare(cls, param: torch.nn.Parameter, backend_name: str, keep_dense: bool):
        """`keep_dense`: the parameter's values are still needed (e.g. a tied embedding)."""
        mm = cls()
        weight = param.detach()
        if backend_name == "invariant":
            mm.invariant = invariant_kernels.PackedLinear.prepare(weight)
        elif backend_name in ("auto", "auto-one-copy"):
            mm._prepare_auto(weight, backend_name)
        else:
            mm._prepare_libraries(param, backend_name, keep_dense)
            if backend_name in ("onednn-openblas", "openblas"):
                return mm  # the dense parameter now views OpenBLAS's copy
        if not keep_dense:
            # One copy: the packed one. An empty parameter fails loudly if anything still
            # reaches for the dense values.
            param.data = torch.empty(0, dtype=param.dtype)
        return mm

    def _prepare_auto(self, weight: torch.Tensor, backend_name: str) -> None:
        self.small = gemv.PackedGemv.prepare(weight)
        self.max_gemv_rows = self.max_blas_rows = gemv_max_rows(weight.dtype, backend_name)
        if backend_name == "auto-one-copy":
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.float(), None)

    def _prepare_libraries(self, param, backend_name: str, keep_dense: bool) -> None:
        if backend_name in ("onednn-openblas", "onednn"):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(param.detach(), None)
        if backend_name in ("onednn-openblas", "openblas"):
            self.max_blas_rows = 1 if backend_name == "onednn-openblas" else MAX_ROWS
            if keep_dense:
                self.rows_major = param.detach().numpy().T  # a view: BLAS handles the stride
            else:
                self.rows_major = transpose_in_place(param)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """The product, or None when torch should compute it on the dense weight."""
        if self.invariant is not None:
            return self.invariant(x, bias)
        rows = x.shape[0]
        if rows <= self.max_gemv_rows:
            return self.small(x, bias)
        if rows <= self.max_blas_rows:
            y = torch.from_numpy(x.numpy() @ self.rows_major)
            return y if bias is None else y + bias
        if self.packed is None:
            return None
        if not self.pad_rows or (bucket := bucket_rows(rows)) == rows:
            return self._onednn(x, bias)
        return self._onednn(padded(x, bucket), bias)[:rows]

    def _onednn(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != torch.float32:  # 16-bit weights with a float32 copy
            bias = None if bias is None else bias.float()
            y = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed, bias, "none", [], "")
            return y.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


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
        rows = x.shape[0]
        if mm.pad_rows and x.dim() == 2 and (bucket := bucket_rows(rows)) != rows:
            # torch's own path (native bf16 runs on oneDNN too): same bounded shapes
            return F.linear(padded(x, bucket), weight, bias)[:rows]
    return F.linear(x, weight, bias)


def set_num_threads(num_threads: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=num_threads, user_api="blas")
