"""Hand-written CPU kernels, compiled on first use with the machine's C compiler.

Only what PyTorch cannot do well without them: decode attention read straight from the
paged KV pool (`paged_attention.c`). The kernels are plain C called through ctypes — no
PyTorch headers, so a build takes about a second — and compiled with `-march=native` into
a cache folder keyed by the source, the flags and the CPU, so a shared home directory on a
mixed cluster never runs code built for another CPU.

Everything here is optional: when no compiler is present, the build fails, or
`PDSERVE_DISABLE_KERNELS=1` is set, `paged_decode_attention` is None and attention falls
back to PyTorch ops (same maths, slower). ctypes releases the GIL during a call, which
lets a batch be split across Python threads: the kernel takes a part index and a part
count and picks its own share of the (sequence, kv head) work items, balanced by context
length, so the caller only hands out part numbers.
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

SOURCE = Path(__file__).with_name("paged_attention.c")
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
# Below this many KV bytes per call, splitting across threads costs more than it saves.
MIN_BYTES_PER_THREAD = 1 << 20
_num_threads: int | None = None  # None: torch's intra-op thread count


def set_num_threads(num_threads: int) -> None:
    global _num_threads
    _num_threads = num_threads


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


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: using PyTorch attention (slower)")
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes()
        + " ".join(CFLAGS).encode()
        + (platform.machine() + cpu_flags()).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"paged_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *CFLAGS, str(SOURCE), "-o", str(built), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            logger.warning("kernel build failed, using PyTorch attention:\n%s", result.stderr)
            return None
        os.replace(built, target)  # atomic: concurrent builders all end with a whole file
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("PDSERVE_DISABLE_KERNELS", "") not in ("", "0"):
        return None
    try:
        path = _build()
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        logger.warning("cannot load kernels (%s): using PyTorch attention", e)
        return None
    fn = lib.paged_decode_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float]
    fn.argtypes += [ctypes.c_int64] * 2
    return lib


@functools.cache
def _pool(num_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(num_threads, thread_name_prefix="pdserve-attn")


def is_available() -> bool:
    return _library() is not None


def paged_decode_attention(
    q: torch.Tensor,  # [S, H, D] float32, contiguous
    k_cache: torch.Tensor,  # [N, B, Hkv, D] float32, contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, M] int64, contiguous
    context_lens: torch.Tensor,  # [S] int64
    scale: float,
) -> torch.Tensor:  # [S, H, D]
    lib = _library()
    if lib is None:
        raise RuntimeError("paged attention kernel is not available")
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
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
    )
    kv_bytes = 2 * int(context_lens.sum()) * num_kv_heads * head_dim * 4
    num_threads = max(
        1,
        min(
            _num_threads or torch.get_num_threads(),
            num_seqs * num_kv_heads,  # work items: (sequence, kv head)
            kv_bytes // MIN_BYTES_PER_THREAD,
        ),
    )
    fn = lib.paged_decode_attention_f32
    # Parts 1.. go to the pool, part 0 runs here: one hand-off fewer per call.
    futures = [
        _pool(num_threads - 1).submit(fn, *args, i, num_threads) for i in range(1, num_threads)
    ]
    status = [fn(*args, 0, num_threads)] + [f.result() for f in futures]
    if any(status):
        raise MemoryError("paged attention kernel could not allocate its scratch buffer")
    return out
