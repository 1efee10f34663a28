"""Decode attention kernel micro-benchmark: the current C kernel vs the first one (baseline).

Times `pdserve.model.kernels.paged_decode_attention` (one layer's decode attention read from
the paged KV pool) against the kernel it replaced, whose C source and Python thread split
are kept below (`BASELINE_SOURCE`, `_baseline_call`) so the comparison survives commits.
Both are compiled with the same flags (`kernels.CFLAGS`).

Workload: the built-in model's attention shape unless told otherwise (8 query heads, 4 kv
heads, head_dim 64, block size 16, float32), every sequence at the same context length,
block tables a random permutation of the pool (blocks scattered as after a long serve).
KV bytes per call = 2 (K and V) x batch x context x kv heads x head_dim x 4. In a real
decode step each layer's KV is cold in cache (a whole step of weights passed since it was
last read), so every call here reads a different copy of the pool: enough copies that one
sweep reads >= 256 MB. Old and new alternate round by round (order flipped every round) on
the same pools; per-call time is the median (and min) over rounds, since the machine is
shared. GB/s is KV bytes per call / median time; the read bandwidth line above the table is
torch `sum` over 512 MB with the same thread count, the practical ceiling.

    .venv/bin/python benchmarks/attention_kernel.py [--rounds 15] [--json-out F]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import math
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import torch

from pdserve.model import kernels

# The first kernel (git 1ccd2ee), three passes per sequence: all scores, softmax, values.
BASELINE_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
}

int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, const int64_t *context_lens,
                               float *out, int64_t num_seqs, int64_t max_blocks,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, int64_t seq_begin,
                               int64_t seq_end) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    int64_t max_len = 1;
    for (int64_t s = seq_begin; s < seq_end; ++s)
        if (context_lens[s] > max_len) max_len = context_lens[s];
    float *scores = malloc(sizeof(float) * (size_t)(num_heads * max_len));
    if (!scores) return 1;
    for (int64_t s = seq_begin; s < seq_end; ++s) {
        const int64_t len = context_lens[s];
        const int64_t *table = block_tables + s * max_blocks;
        const float *q_seq = q + s * num_heads * head_dim;
        float *out_seq = out + s * num_heads * head_dim;
        for (int64_t t = 0; t < len; ++t) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *k_row = k_cache + slot * token_stride;
            for (int64_t h = 0; h < num_heads; ++h)
                scores[h * len + t] =
                    dot(q_seq + h * head_dim, k_row + (h / group) * head_dim, head_dim) * scale;
        }
        for (int64_t h = 0; h < num_heads; ++h) {
            float *row = scores + h * len;
            float m = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < len; ++t) m = row[t] > m ? row[t] : m;
            for (int64_t t = 0; t < len; ++t) {
                row[t] = expf(row[t] - m);
                sum += row[t];
            }
            const float inv = 1.0f / sum;
            for (int64_t t = 0; t < len; ++t) row[t] *= inv;
        }
        memset(out_seq, 0, sizeof(float) * (size_t)(num_heads * head_dim));
        for (int64_t t = 0; t < len; ++t) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *v_row = v_cache + slot * token_stride;
            for (int64_t h = 0; h < num_heads; ++h) {
                const float p = scores[h * len + t];
                const float *restrict v = v_row + (h / group) * head_dim;
                float *restrict o = out_seq + h * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) o[d] += p * v[d];
            }
        }
    }
    free(scores);
    return 0;
}
"""
COPY_BYTES = 256 << 20  # KV bytes one sweep over the pool copies reads, at least
MIN_ROUND_SECONDS = 0.05


def build_baseline(tmp: Path) -> ctypes.CDLL:
    source = tmp / "baseline.c"
    source.write_text(BASELINE_SOURCE)
    digest = hashlib.sha256(BASELINE_SOURCE.encode()).hexdigest()[:8]
    target = tmp / f"baseline-{digest}.so"
    subprocess.run(["cc", *kernels.CFLAGS, str(source), "-o", str(target), "-lm"], check=True)
    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float]
    fn.argtypes += [ctypes.c_int64] * 2
    return lib


def baseline_call(lib, pool, num_threads, q, k_cache, v_cache, tables, lens, scale):
    """The baseline's Python side: contiguous sequence ranges, every range on the pool."""
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr())
    args += (lens.data_ptr(), out.data_ptr(), num_seqs, tables.shape[1], num_heads)
    args += (k_cache.shape[2], head_dim, k_cache.shape[1], scale)
    kv_bytes = 2 * int(lens.sum()) * k_cache.shape[2] * head_dim * 4
    n = max(1, min(num_threads, num_seqs, kv_bytes // kernels.MIN_BYTES_PER_THREAD))
    fn = lib.paged_decode_attention_f32
    if n == 1:
        fn(*args, 0, num_seqs)
    else:
        bounds = [num_seqs * i // n for i in range(n + 1)]
        futures = [pool.submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(n)]
        [f.result() for f in futures]
    return out


def make_case(args, batch: int, context: int, seed: int = 0):
    """Query, pool copies and scattered block tables for `batch` sequences of `context`."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = math.ceil(context / args.block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
    kv_bytes = 2 * batch * context * args.num_kv_heads * args.head_dim * 4
    num_copies = max(1, min(256, math.ceil(COPY_BYTES / kv_bytes)))
    pools = [
        (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
        for _ in range(num_copies)
    ]
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).contiguous()
    lens = torch.full((batch,), context, dtype=torch.int64)
    q = torch.randn(batch, args.num_heads, args.head_dim, generator=gen)
    return q, pools, tables, lens, kv_bytes


def sweep_seconds(call, pools, repeats: int) -> float:
    """Wall seconds per call over `repeats` sweeps of every pool copy."""
    start = time.perf_counter()
    for _ in range(repeats):
        for k_cache, v_cache in pools:
            call(k_cache, v_cache)
    return (time.perf_counter() - start) / (repeats * len(pools))


def measure(args, lib, batch, context, num_threads) -> dict:
    q, pools, tables, lens, kv_bytes = make_case(args, batch, context)
    scale = args.head_dim**-0.5
    kernels.set_num_threads(num_threads)
    pool = ThreadPoolExecutor(num_threads)
    calls = {
        "old": lambda k, v: baseline_call(lib, pool, num_threads, q, k, v, tables, lens, scale),
        "new": lambda k, v: kernels.paged_decode_attention(q, k, v, tables, lens, scale),
    }
    want, got = (calls[name](*pools[0]) for name in ("old", "new"))
    max_rel = float((got - want).abs().max() / want.abs().max())
    # Warm up (page faults, thread start) and size a round to >= MIN_ROUND_SECONDS.
    once = max(sweep_seconds(c, pools, 1) * len(pools) for c in calls.values())
    repeats = max(1, math.ceil(MIN_ROUND_SECONDS / once))
    times = {name: [] for name in calls}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name in order:
            times[name].append(sweep_seconds(calls[name], pools, repeats))
    pool.shutdown()
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    return {
        "batch": batch,
        "context": context,
        "threads": num_threads,
        "kv_mb": kv_bytes / 1e6,
        "old_ms": med["old"] * 1e3,
        "new_ms": med["new"] * 1e3,
        "old_min_ms": best["old"] * 1e3,
        "new_min_ms": best["new"] * 1e3,
        "old_gbs": kv_bytes / med["old"] / 1e9,
        "new_gbs": kv_bytes / med["new"] / 1e9,
        "speedup": med["old"] / med["new"],
        "max_rel_diff": max_rel,
    }


def read_bandwidth(num_threads: int) -> float:
    """GB/s of torch `sum` over 512 MB fp32 with `num_threads` threads, best of 5."""
    torch.set_num_threads(num_threads)
    x = torch.ones(128 << 20)
    x.sum()
    seconds = common.best_of(x.sum, 5)
    return x.numel() * 4 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if not kernels.is_available():
        raise SystemExit("the C kernel is not available here (no compiler?)")

    bandwidth = {n: read_bandwidth(n) for n in args.threads}
    common.print_header(
        "Decode attention kernel: current vs baseline (one layer, float32)",
        {
            "hardware": common.hardware_info(),
            "kernel": {"cflags": " ".join(kernels.CFLAGS), "baseline": "git 1ccd2ee"},
            "workload": {
                "heads": f"{args.num_heads} query / {args.num_kv_heads} kv, "
                f"head_dim {args.head_dim}, block_size {args.block_size}",
                "block tables": "random permutation of the pool",
                "timing": f"{args.rounds} interleaved rounds, median (min) per call",
                "load_avg_1min": round(common.machine_load(), 2),
            },
            "read bandwidth (torch sum 512 MB)": {
                f"{n} thread(s)": f"{gbs:.1f} GB/s" for n, gbs in bandwidth.items()
            },
        },
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_baseline(Path(tmp))
        for batch in args.batches:
            for context in args.contexts:
                for num_threads in args.threads:
                    r = measure(args, lib, batch, context, num_threads)
                    rows.append(r)
                    print(
                        f"  batch {batch:2d} context {context:4d} threads {num_threads}: "
                        f"old {r['old_ms']:.3f} ms, new {r['new_ms']:.3f} ms, "
                        f"x{r['speedup']:.2f}",
                        flush=True,
                    )
    print()
    headers = ["batch", "context", "threads", "KV MB", "old ms (min)", "new ms (min)"]
    headers += ["old GB/s", "new GB/s", "new/old speed", "max diff / max abs"]
    print(
        common.format_table(
            headers,
            [
                [
                    r["batch"],
                    r["context"],
                    r["threads"],
                    r["kv_mb"],
                    f"{r['old_ms']:.3f} ({r['old_min_ms']:.3f})",
                    f"{r['new_ms']:.3f} ({r['new_min_ms']:.3f})",
                    r["old_gbs"],
                    r["new_gbs"],
                    f"{r['speedup']:.2f}x",
                    f"{r['max_rel_diff']:.1e}",
                ]
                for r in rows
            ],
        )
    )
    common.write_json(args.json_out, {"bandwidth_gbs": bandwidth, "results": rows})


if __name__ == "__main__":
    main()
