"""Hand-written CPU kernels, compiled on first use with the machine's C compiler.

Only what PyTorch cannot do well without them: decode attention read straight from the
paged KV pool (`paged_attention.c`; float32 queries over a float32, bfloat16 or float16
pool), a decoder layer's element-wise parts fused into one
pass each (`elementwise.c`: SiLU-and-multiply, RMSNorm with the residual add, RoPE), and
the sampler's top-p mask without a sort (`sampling.c`, bound in `sampling.py`), the
sampler's maths row by row for the batch-invariant mode (`categorical.c`, same binding),
and that mode's matrix product (`gemm.c`, its own library: `invariant.py`), and the
small-batch decode product over float32 or 16-bit weights (`gemv.c`, bound in `gemv.py`;
it shares the attention kernel's thread pool, so idle workers of one never spin on the
cores the other needs), and a pure-decode step from token ids to logits calling those
kernels from C in one call (`decode_step.c`, bound in `decode_step.py`). The kernels are plain C called through ctypes — no
PyTorch headers, so a build takes about a second — and compiled with `-march=native` into
a cache folder keyed by the source, the flags and the CPU, so a shared home directory on a
mixed cluster never runs code built for another CPU.

Everything here is optional: when no compiler is present, the build fails, or
`PDSERVE_DISABLE_KERNELS=1` is set, `is_available()` is False and the model falls back to
PyTorch ops (same maths, slower). Threads: attention splits its (sequence, kv head)
work items, balanced by context length, into parts that a small C thread pool runs
(`parallel.c`; a Python pool hand-off costs ~55 us); the element-wise kernels split rows
across Python threads (ctypes releases the GIL), only for inputs large enough to repay it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "paged_attention.c",
        "elementwise.c",
        "sampling.c",
        "categorical.c",
        "gemv.c",
        "parallel.c",
        "gemm_int8.c",
        "decode_step.c",
    )
]
HEADERS = [Path(__file__).with_name(n) for n in ("simd.h", "parallel.h")]
# Exact IEEE maths except that sums may be reordered (so loops vectorise) and a*b+c fused.
CFLAGS = [
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-ffp-contract=fast",
]
# `PDSERVE_KERNELS_ISA=avx2` builds the kernels as for a CPU without AVX-512 (e.g. Zen 3),
# so that path can be tested and measured on an AVX-512 host too.
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"]}
# Below this many KV bytes per call, splitting across threads costs more than it saves.
MIN_BYTES_PER_THREAD = 1 << 20
# Element-wise kernels: below this many floats per thread, one thread does the whole call.
MIN_FLOATS_PER_THREAD = 1 << 17
# Element types of a KV pool the kernels read and write (simd.h's DT_* codes).
KV_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_num_threads: int | None = None  # None: torch's intra-op thread count


def set_num_threads(num_threads: int) -> None:
    global _num_threads
    _num_threads = num_threads


def isa_flags() -> list[str]:
    """Extra compiler flags for `PDSERVE_KERNELS_ISA` (default `native`: none), and the
    weight-stream prefetch hint for this CPU (`prefetch_locality`)."""
    isa = os.environ.get("PDSERVE_KERNELS_ISA", "") or "native"
    if isa not in ISA_FLAGS:
        raise ValueError(f"PDSERVE_KERNELS_ISA={isa!r} is not one of {', '.join(ISA_FLAGS)}")
    flags = ISA_FLAGS[isa] + [f"-DPREFETCH_LOCALITY={prefetch_locality()}"]
    distance = prefetch_bytes()
    return flags + ([f"-DPREFETCH_BYTES={distance}"] if distance is not None else [])


# The gemv kernel's software prefetch of the weight stream (`__builtin_prefetch` locality,
# 0 = prefetchnta ... 3 = prefetcht0), by CPU vendor, as measured: on AMD Zen 4 the kernel
# reached 86 % of the read roofline with prefetchnta; on an Intel Xeon with AMX (KVM, 2
# vCPUs) prefetchnta halved the weight stream (6.9 GB/s per thread against 12.4 with
# prefetcht0; torch's sum reads 14). `PDSERVE_PREFETCH_LOCALITY` overrides it.
PREFETCH_LOCALITY = {"GenuineIntel": 3}
DEFAULT_PREFETCH_LOCALITY = 0


def prefetch_locality() -> int:
    value = os.environ.get("PDSERVE_PREFETCH_LOCALITY", "")
    if value:
        if value not in ("0", "1", "2", "3"):
            raise ValueError(f"PDSERVE_PREFETCH_LOCALITY={value!r} must be 0, 1, 2 or 3")
        return int(value)
    return PREFETCH_LOCALITY.get(cpu_vendor(), DEFAULT_PREFETCH_LOCALITY)


# How far ahead of the weight stream the gemv kernel prefetches, by CPU vendor, as
# measured: on the Intel Xeon with AMX 4096 bytes made batch-1 decode 1.06-1.19x faster
# than gemv.c's 1024 (float32 and bfloat16, in both orders of a side-by-side run; no
# change at batch 16/32); AMD keeps 1024, measured there. `PDSERVE_PREFETCH_BYTES`
# overrides it.
PREFETCH_BYTES = {"GenuineIntel": 4096}


def prefetch_bytes() -> int | None:
    """The prefetch distance for this CPU (None: gemv.c's own default, 1024)."""
    value = os.environ.get("PDSERVE_PREFETCH_BYTES", "")
    if value:
        if not value.isdigit() or not 64 <= int(value) <= 65536:
            raise ValueError(f"PDSERVE_PREFETCH_BYTES={value!r} must be 64-65536")
        return int(value)
    return PREFETCH_BYTES.get(cpu_vendor())


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, ...; "" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def _cache_dir() -> Path:
    root = os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve"
    return Path(root) / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(
    name: str = "pdserve_kernels",
    sources: list[Path] = SOURCES,
    headers: list[Path] = HEADERS,
    cflags: list[str] = CFLAGS,
) -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: %s not built (PyTorch paths are used)", name)
        return None
    key = hashlib.sha256(
        b"".join(path.read_bytes() for path in sources + headers)
        + " ".join(cflags).encode()
        + (platform.machine() + cpu_flags()).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *cflags, *map(str, sources), "-o", str(built), "-lm", "-lpthread"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            logger.warning("%s build failed (PyTorch paths are used):\n%s", name, result.stderr)
            return None
        os.replace(built, target)  # atomic: concurrent builders all end with a whole file
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("PDSERVE_DISABLE_KERNELS", "") not in ("", "0"):
        return None
    try:
        path = _build(cflags=CFLAGS + isa_flags())
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        logger.warning("cannot load kernels (%s): using PyTorch attention", e)
        return None
    return _bind(lib)


@functools.cache
def variant(extra_flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """The library as another CPU gets it (tests: `("-mno-avx512f",)`, the AVX2 code), for
    the `lib` argument of the functions below."""
    path = _build(cflags=CFLAGS + isa_flags() + list(extra_flags))
    return None if path is None else _bind(ctypes.CDLL(str(path)))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    fn = lib.paged_decode_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float]
    fn.argtypes += [ctypes.c_int64, ctypes.c_int] + [ctypes.c_int64] * 2
    mt = lib.paged_decode_attention_mt_f32
    mt.restype = ctypes.c_int
    mt.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float]
    mt.argtypes += [ctypes.c_int64, ctypes.c_int] + [ctypes.c_int64] * 2
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.silu_mul_f32.restype = None
    lib.silu_mul_f32.argtypes = [ptr, ptr] + [i64] * 4
    lib.rms_norm_f32.restype = None
    lib.rms_norm_f32.argtypes = [ptr] * 4 + [i64, i64, ctypes.c_float, i64, i64]
    lib.rope_neox_f32.restype = None
    lib.rope_neox_f32.argtypes = [ptr] * 3 + [i64] * 5
    lib.write_kv_f32.restype = ctypes.c_int
    lib.write_kv_f32.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.write_kv_f32.argtypes += [i64, i64]
    return lib


@functools.cache
def _pool(num_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(num_threads, thread_name_prefix="pdserve-attn")


def is_available() -> bool:
    return _library() is not None


def reads_kv(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when the attention kernel and `write_kv` handle float32 queries (keys, values)
    over a pool like `k_cache` (float32, bfloat16 or float16, on CPU)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_cache.dtype in KV_DTYPE_CODES
        and is_available()
    )


def paged_decode_attention(
    q: torch.Tensor,  # [S, H, D] float32, heads contiguous (rows may be strided)
    k_cache: torch.Tensor,  # [N, B, Hkv, D] float32, bfloat16 or float16, contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, M] int64, contiguous
    context_lens: torch.Tensor,  # [S] int64
    scale: float,
    lib: ctypes.CDLL | None = None,  # default: this CPU's build
) -> torch.Tensor:  # [S, H, D]
    lib = lib or _library()
    if lib is None:
        raise RuntimeError("paged attention kernel is not available")
    num_seqs, num_heads, head_dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype)
    args = (
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        num_seqs,
        block_tables.shape[1],
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        q.stride(0),
        KV_DTYPE_CODES[k_cache.dtype],
    )
    num_threads = max(
        1,
        min(
            _num_threads or torch.get_num_threads(),
            num_seqs * num_kv_heads,  # work items: (sequence, kv head)
        ),
    )
    # the kernel lowers the count when the keys and values (K and V) are few
    min_tokens = MIN_BYTES_PER_THREAD // (2 * head_dim * k_cache.element_size())
    if lib.paged_decode_attention_mt_f32(*args, num_threads, min_tokens):
        raise MemoryError("paged attention kernel could not allocate its scratch buffer")
    return out


# ---- element-wise kernels (elementwise.c) ---------------------------------------------------


def fuses(x: torch.Tensor) -> bool:
    """True when the fused element-wise kernels apply to activations like `x`."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and is_available()


def _by_rows(fn, args: tuple, rows: int, floats: int) -> None:
    """Call `fn(*args, begin, end)` over all rows: in this thread when small, else split into
    contiguous row ranges across the threads (ctypes releases the GIL)."""
    num_threads = max(1, min(_num_threads or torch.get_num_threads(), rows,
                             floats // MIN_FLOATS_PER_THREAD))  # fmt: skip
    if num_threads == 1:
        fn(*args, 0, rows)
        return
    bounds = [rows * i // num_threads for i in range(num_threads + 1)]
    futures = [
        _pool(num_threads - 1).submit(fn, *args, bounds[i], bounds[i + 1])
        for i in range(1, num_threads)
    ]
    fn(*args, bounds[0], bounds[1])
    for future in futures:
        future.result()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up = [gate | up]` of shape `[T, 2 I]` (rows may be
    strided, columns contiguous) -> `[T, I]`."""
    rows, width = gate_up.shape
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    inter = width // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    args = (gate_up.data_ptr(), out.data_ptr(), inter, gate_up.stride(0))
    _by_rows(_library().silu_mul_f32, args, rows, rows * width)
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of `x` `[T, dim]` (columns contiguous). With `residual` (contiguous, same
    shape), `x += residual` first, in place: x is then the updated residual stream."""
    rows, dim = x.shape
    if x.stride(1) != 1 or weight.stride(0) != 1:
        raise ValueError("rms_norm needs contiguous rows")
    if residual is not None:
        residual = residual.contiguous()
    out = torch.empty(rows, dim, dtype=x.dtype)
    args = (
        x.data_ptr(),
        residual.data_ptr() if residual is not None else None,
        weight.data_ptr(),
        out.data_ptr(),
        dim,
        x.stride(0),
        eps,
    )
    _by_rows(_library().rms_norm_f32, args, rows, rows * dim)
    return out


def rope_neox_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-halves RoPE on `x` `[T, heads, D]` in place (heads D apart, D contiguous; rows
    may be strided, e.g. a view into the fused q/k/v output). cos, sin: `[T, 1, D/2]`."""
    rows, heads, head_dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != head_dim:
        raise ValueError("rope_neox_ needs each row's heads packed")
    cos, sin = cos.contiguous(), sin.contiguous()
    args = (x.data_ptr(), cos.data_ptr(), sin.data_ptr(), heads, head_dim, x.stride(0))
    _by_rows(_library().rope_neox_f32, args, rows, rows * heads * head_dim)
    return x


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D] float32, heads contiguous (rows may be strided)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [N, B, Hkv, D] contiguous, float32, bfloat16 or float16
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
    lib: ctypes.CDLL | None = None,  # default: this CPU's build
) -> bool:
    """Copy each row's keys and values into its pool slot (rounded to nearest even for a
    16-bit pool, as `Tensor.to` rounds), in this thread; False (nothing done) when the
    layouts are not the plain ones this copy handles."""
    rows, heads, head_dim = k.shape
    plain = all(x.stride(2) == 1 and x.stride(1) == head_dim for x in (k, v))
    plain = plain and k.dtype == v.dtype == torch.float32 and k_cache.dtype == v_cache.dtype
    if not (plain and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return False
    slots = slot_mapping.contiguous()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    failed = (lib or _library()).write_kv_f32(
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0),
        v.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        num_slots,
        heads * head_dim,
        KV_DTYPE_CODES[k_cache.dtype],
        0,
        rows,
    )
    if failed:
        raise IndexError(f"KV slot out of range [0, {num_slots})")  # as index_copy_ would
    return True
