"""Decode step time: pdserve vs this machine's bandwidth roofline and vs llama.cpp.

Batch-1 decode reads every weight once per token (a matrix-vector product per layer), so
its floor is (weight bytes + KV bytes read at that context) ÷ memory read bandwidth. This
script measures that bandwidth itself (torch `sum` over a 1 GiB fp32 tensor, best of
several, before and after the timings: the higher reading counts), times pdserve's decode
step, and prints the achieved fraction of the floor.

pdserve's step time excludes prefill: generate `max_tokens=1` and `max_tokens=1+N` for the
same prompts of CONTEXT tokens and divide the difference by N. The prompts are prefilled
once beforehand, so both calls find them in the prefix cache and their (tiny) prefill
cancels out. Batches of 16 and 32 use the same method.

`--variants` measures several pdserve builds side by side in one run, in turns: a variant is
`BACKEND[@ISA][:unfused]`, BACKEND a `PDSERVE_CPU_BLAS` value (`auto`: the gemv kernel for
decode-sized products; `onednn-openblas`: the default before it), ISA a
`PDSERVE_KERNELS_ISA` value (`avx2`: the C kernels built without AVX-512, i.e. the AVX2 path
on an AVX-512 host; it is labelled so in the table), `:unfused` sets
`PDSERVE_FUSED_DECODE=0` (decode steps layer by layer through PyTorch, not one C call) and
`:chunks256k` cuts each product into 256 KiB chunks of weights claimed one at a time
instead of four chunks per thread (set in the kernel library before each of the
variant's timings).

llama.cpp runs on the same model folder converted to GGUF at the same dtype, with its
default f16 KV cache (measured here: an f32 cache takes a slow flash-attention path, 3x
slower at batch 16, and bf16 is slower than f16 too, so matching pdserve's cache dtype
would understate the peer): `llama-bench -p 0 -n N -d CONTEXT` for batch 1 and
`llama-batched-bench -npp CONTEXT -ntg N` for larger batches.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import torch

GOAL_ROOFLINE = 0.80
GOAL_VS_LLAMACPP = 1.0
DEFAULT_CHUNK_BYTES = 0  # gemv.c's default: four chunks per thread
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GGUF_TYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


# ----------------------------------------------------------------------------- roofline


def measure_read_bandwidth(gib: float, repeats: int) -> float:
    """Bytes/s of torch `sum` over a `gib` GiB fp32 tensor, best of `repeats`."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()  # NOTE: first pass faults the pages in; it is not timed.
    seconds = common.best_of(x.sum, repeats)
    nbytes = x.numel() * 4
    del x
    gc.collect()
    return nbytes / seconds


def weight_bytes_per_step(model_dir: Path, dtype: str) -> int:
    """Bytes of every weight a decode step reads: all but the embedding table (a gather).

    With tied embeddings the LM head *is* the table, so it is counted once as the head.
    """
    shapes = common.weight_shapes(model_dir)
    tied = common.model_info(model_dir)["tied_embeddings"]
    total = 0
    for name, shape in shapes.items():
        if "embed_tokens" not in name or tied:
            total += common.num_elements(shape)
    return total * DTYPE_BYTES[dtype]


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """K and V bytes one token occupies across all layers (KV cache in the model dtype)."""
    cfg = common.load_config(model_dir)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


def roofline_seconds(model_dir: Path, dtype: str, context: float, bandwidth: float) -> float:
    """Batch-1 floor: weights plus the KV cache at `context` tokens, read once per step."""
    weights = weight_bytes_per_step(model_dir, dtype)
    return (weights + context * kv_bytes_per_token(model_dir, dtype)) / bandwidth


# ----------------------------------------------------------------------------- pdserve


class PdserveDecodeTimer:
    """Times decode steps of one pdserve `LLM` by differencing two generate lengths.

    The prompts are prefilled once (`prime`); every timed call then reuses them, so the
    prefix cache serves both calls of a difference alike and the expensive prefill of
    32 × 512 tokens (slow in bf16 on CPUs without bf16 instructions) is paid only once.
    Each sequence still reads its own KV blocks while decoding, as with fresh prompts.
    """

    def __init__(
        self,
        model_dir: Path,
        dtype: str,
        max_batch: int,
        args: argparse.Namespace,
        quantization: str | None = None,
    ):
        from pdserve import LLM, SamplingParams

        self.params_cls = SamplingParams
        self.context = args.context
        # A KV pool sized for this run (the 2 GiB default per engine, times the variants
        # held at once, ran a loaded host out of memory).
        tokens = max_batch * (args.context + args.decode_steps + 64)
        pool_gib = 1.25 * tokens * kv_bytes_per_token(model_dir, dtype) / 2**30
        kwargs = {"max_num_seqs": max_batch, "num_threads": args.threads}
        kwargs["kv_cache_memory_gib"] = pool_gib
        kwargs["quantization"] = quantization  # benchmarks/int8_weights.py
        if getattr(args, "kv_cache_memory_gib", None):
            kwargs["kv_cache_memory_gib"] = args.kv_cache_memory_gib
        if args.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
        self.llm = LLM(model=str(model_dir), dtype=dtype, **kwargs)
        vocab = common.load_config(model_dir)["vocab_size"]
        self.prompts = common.random_prompts([args.context] * max_batch, vocab, seed=1000)
        self.min_cached_tokens: int | None = None
        # --cpu-time: the process's CPU time (one engine thread: the work itself, whatever
        # else loads the host) instead of the wall clock
        self.clock = time.process_time if args.cpu_time else time.perf_counter

    def prime(self) -> float:
        """Prefill every prompt once (this also warms the engine up); the wall seconds."""
        return self._generate(len(self.prompts), 1)

    def _generate(self, batch: int, max_tokens: int) -> float:
        """Wall seconds of one generate over the first `batch` prompts."""
        inputs = [{"prompt_token_ids": p} for p in self.prompts[:batch]]
        params = self.params_cls(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = self.clock()
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        seconds = self.clock() - start
        got = {len(o.outputs[0].token_ids) for o in outs}
        if got != {max_tokens}:
            raise RuntimeError(f"asked for {max_tokens} tokens per prompt, got {sorted(got)}")
        cached = min(o.num_cached_tokens for o in outs)
        self.min_cached_tokens = min(cached, self.min_cached_tokens or cached)
        return seconds

    def step_seconds(self, batch: int, steps: int, repeats: int) -> float:
        """Seconds per decode step at `batch`: (best t(1+N) − best t(1)) / N."""
        short = min(self._generate(batch, 1) for _ in range(repeats))
        long = min(self._generate(batch, 1 + steps) for _ in range(repeats))
        return (long - short) / steps

    def close(self) -> None:
        """Drop the engine and its KV pool before the next dtype loads."""
        del self.llm
        gc.collect()


def decode_steps_for(batch: int, args: argparse.Namespace) -> int:
    """N: --decode-steps at batch 1, --batch-decode-steps above (each step costs B tokens)."""
    return args.decode_steps if batch == 1 else args.batch_decode_steps


MODES = ("unfused", "chunks256k", "nta", "t0")
# `:nta` / `:t0`: the gemv kernel's weight prefetch as prefetchnta / prefetcht0
# (PDSERVE_PREFETCH_LOCALITY 0 / 3) instead of this CPU's default (kernels.prefetch_locality).
PREFETCH_MODES = {"nta": "0", "t0": "3"}
# `:pfN`: the prefetch N bytes ahead of the weight stream (PDSERVE_PREFETCH_BYTES; gemv.c: 1024)


def is_mode(mode: str) -> bool:
    return mode in MODES or (mode.startswith("pf") and mode[2:].isdigit())


def parse_variant(variant: str) -> tuple[str, str, bool]:
    """`BACKEND[@ISA][:MODE...]` -> (backend, isa or "", fused)."""
    base, *modes = variant.split(":")
    if not all(is_mode(m) for m in modes):
        raise SystemExit(f"variant {variant!r}: modes are {', '.join(MODES)}, pfN")
    backend, _, isa = base.partition("@")
    return backend, isa, "unfused" not in modes


def variant_chunk_bytes(variant: str) -> int:
    """The gemv kernel's weight bytes per chunk of work for `variant` (`:chunks256k`:
    256 KiB chunks claimed one at a time; else 0, the default: four chunks per thread)."""
    return 256 * 1024 if "chunks256k" in variant.split(":")[1:] else DEFAULT_CHUNK_BYTES


@contextlib.contextmanager
def variant_env(variant: str):
    """Environment of one `BACKEND[@ISA][:unfused]` variant while its engine is built."""
    backend, isa, fused = parse_variant(variant)
    values = {"PDSERVE_CPU_BLAS": backend, "PDSERVE_KERNELS_ISA": isa or "native"}
    values["PDSERVE_FUSED_DECODE"] = "1" if fused else "0"
    values["PDSERVE_PREFETCH_LOCALITY"] = variant_prefetch(variant)
    values["PDSERVE_PREFETCH_BYTES"] = variant_prefetch_bytes(variant)
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def variant_prefetch(variant: str) -> str:
    """PDSERVE_PREFETCH_LOCALITY for `variant` ("": the CPU's default)."""
    modes = variant.split(":")[1:]
    return next((PREFETCH_MODES[m] for m in modes if m in PREFETCH_MODES), "")


def variant_prefetch_bytes(variant: str) -> str:
    """PDSERVE_PREFETCH_BYTES for `variant` ("": the kernel's default)."""
    return next((m[2:] for m in variant.split(":")[1:] if m.startswith("pf")), "")


def variant_label(variant: str) -> str:
    backend, isa, fused = parse_variant(variant)
    label = backend + (f" ({isa.upper()} path on this host)" if isa else "")
    label += "" if fused else ", layer by layer"
    label += {"0": ", prefetchnta", "3": ", prefetcht0", "": ""}[variant_prefetch(variant)]
    distance = variant_prefetch_bytes(variant)
    label += f", prefetch {distance} B ahead" if distance else ""
    return label + (", 256 KiB chunks" if variant_chunk_bytes(variant) else "")


def measure_pdserve(
    model_dir: Path, dtype: str, args: argparse.Namespace
) -> dict[str, dict[int, float]]:
    """Variant → batch size → seconds per decode step, for one dtype. Variants of one ISA
    live in this process together and are measured in turns, `--rounds` times (best of
    rounds); one ISA's group finishes before the next loads its kernel library."""
    steps: dict[str, dict[int, float]] = {}

    def build(v: str) -> tuple[str, str]:  # variants sharing one kernel library
        return parse_variant(v)[1], variant_prefetch(v), variant_prefetch_bytes(v)

    for key in dict.fromkeys(build(v) for v in args.variants):
        group = [v for v in args.variants if build(v) == key]
        steps |= _measure_group(model_dir, dtype, group, args)
    return steps


def _measure_group(model_dir, dtype, variants, args) -> dict[str, dict[int, float]]:
    from pdserve.model.kernels import gemv

    timers = {}
    for variant in variants:
        with variant_env(variant):
            _reset_kernel_caches()  # NOTE: each ISA's kernels are built and bound at load
            timers[variant] = PdserveDecodeTimer(model_dir, dtype, max(args.batch_sizes), args)
            prime = timers[variant].prime()
        print(f"  pdserve {dtype} {variant}: prefill of the prompts: {prime:.1f} s", flush=True)
    steps: dict[str, dict[int, float]] = {v: {} for v in variants}
    try:
        for _ in range(args.rounds):
            for batch in args.batch_sizes:
                for variant, timer in timers.items():
                    gemv.set_chunk_bytes(variant_chunk_bytes(variant))  # one library per ISA
                    n = decode_steps_for(batch, args)
                    t = timer.step_seconds(batch, n, args.repeats if batch == 1 else 1)
                    steps[variant][batch] = min(t, steps[variant].get(batch, t))
                    print(f"  pdserve {dtype} {variant} batch {batch}: {t * 1e3:.1f} ms/step")
        for timer in timers.values():
            _check_cache_hits(timer)
    finally:
        gemv.set_chunk_bytes(DEFAULT_CHUNK_BYTES)
        for timer in timers.values():
            timer.close()
    return steps


def _reset_kernel_caches() -> None:
    """Forget the loaded kernel library so the next engine builds its variant's ISA."""
    from pdserve.model import kernels
    from pdserve.model.kernels import gemv

    kernels._library.cache_clear()
    gemv.library.cache_clear()


def _check_cache_hits(timer: PdserveDecodeTimer) -> None:
    """Say so when timed calls recomputed prompts (then prefill was not the same in both)."""
    cached = timer.min_cached_tokens or 0
    print(f"  pdserve: timed calls found ≥{cached} of {timer.context} prompt tokens cached")
    # The engine recomputes a prompt's last (partial) block on a hit; that cancels out too.
    if cached < timer.context // 2:
        print("  WARNING: prefix cache missed; step times include prefill noise", flush=True)


# ----------------------------------------------------------------------------- llama.cpp


def llamacpp_batch1(gguf: Path, args: argparse.Namespace) -> float | None:
    """Tokens/s of `llama-bench` text generation at batch 1 after CONTEXT tokens of depth."""
    binary = common.llamacpp_bin("llama-bench")
    if binary is None:
        return None
    cmd = [str(binary), "-m", str(gguf), "-p", "0", "-n", str(args.decode_steps)]
    cmd += ["-d", str(args.context), "-t", str(args.threads), "-r", str(args.repeats)]
    out = _run_peer([*cmd, "-o", "json"])
    return json.loads(out)[0]["avg_ts"] if out else None


def llamacpp_batched(gguf: Path, args: argparse.Namespace) -> dict[int, float]:
    """Batch size → generation tokens/s from `llama-batched-bench` (batches > 1 only)."""
    binary = common.llamacpp_bin("llama-batched-bench")
    batches = [b for b in args.batch_sizes if b > 1]
    if binary is None or not batches:
        return {}
    ctx = max(batches) * (args.context + args.batch_decode_steps + 16)
    cmd = [str(binary), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512"]
    cmd += ["-npp", str(args.context), "-ntg", str(args.batch_decode_steps)]
    cmd += ["-npl", ",".join(map(str, batches)), "-t", str(args.threads)]
    cmd += ["-tb", str(args.threads), "--output-format", "jsonl"]
    out = _run_peer(cmd, with_stderr=True)  # its log writer may use either stream
    rows = [json.loads(line) for line in (out or "").splitlines() if '"speed_tg"' in line]
    return {row["pl"]: row["speed_tg"] for row in rows}


def _run_peer(cmd: list[str], with_stderr: bool = False) -> str | None:
    """Run a llama.cpp tool; its output, or None (with its stderr tail) when it failed."""
    print("  $", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  llama.cpp failed ({proc.returncode}):\n{proc.stderr[-1500:]}", file=sys.stderr)
        return None
    return proc.stdout + ("\n" + proc.stderr if with_stderr else "")


def measure_llamacpp(model_dir: Path, dtype: str, args: argparse.Namespace) -> dict[int, float]:
    """Batch size → tokens/s for llama.cpp at one dtype; empty when the peer is absent."""
    if args.no_llamacpp or common.llamacpp_bin("llama-bench") is None:
        return {}
    gguf = common.gguf_for(model_dir, GGUF_TYPE[dtype])
    if gguf is None:
        return {}
    results = llamacpp_batched(gguf, args)
    if 1 in args.batch_sizes:
        results[1] = llamacpp_batch1(gguf, args)
    return {b: v for b, v in results.items() if v}


# ----------------------------------------------------------------------------- report


def result_rows(model_dir, dtype, variant_steps, llama_tps, bandwidth, args) -> list[dict]:
    """One row per variant and batch size: step time, tok/s, roofline share, llama.cpp and
    the ratio, and the speed-up over the first variant (the baseline) when there are more."""
    mid_context = args.context + (args.decode_steps + 1) / 2
    floor = roofline_seconds(model_dir, dtype, mid_context, bandwidth)
    rows = []
    baseline = variant_steps.get(args.variants[0], {})
    for variant in args.variants:
        for batch in args.batch_sizes:
            step = variant_steps.get(variant, {}).get(batch)
            row = _result_row(dtype, variant, batch, step, llama_tps.get(batch), floor)
            base = baseline.get(batch)
            row["vs_first_variant"] = base / step if base and step else None
            rows.append(row)
    return rows


def _result_row(dtype, variant, batch, step, peer, floor) -> dict:
    """One table row: pdserve's step and tok/s, llama.cpp's tok/s, the goal and verdict."""
    pd_tps = batch / step if step else None
    ratio = pd_tps / peer if pd_tps and peer else None
    row = {"dtype": dtype, "variant": variant_label(variant), "batch": batch}
    row |= {"pdserve_ms": step and step * 1e3}
    row |= {"pdserve_tok_s": pd_tps, "llamacpp_tok_s": peer, "ratio": ratio}
    return row | _goal_columns(batch, floor, step, peer, ratio)


def _goal_columns(batch, floor, step, peer, ratio) -> dict:
    """Batch 1 is judged against the roofline; batches ≥16 against llama.cpp."""
    if batch != 1:
        goal = "≥1x llama.cpp" if batch >= 16 else ""
        verdict = common.goal_verdict(ratio, GOAL_VS_LLAMACPP) if goal else ""
        return {
            "roofline_ms": None,
            "pdserve_roofline": None,
            "llamacpp_roofline": None,
            "goal": goal,
            "verdict": verdict,
        }
    share = floor / step if step else None
    return {
        "roofline_ms": floor * 1e3,
        "pdserve_roofline": share,
        "llamacpp_roofline": floor * peer if peer else None,
        "goal": f"≥{GOAL_ROOFLINE:.0%} roofline",
        "verdict": common.goal_verdict(share, GOAL_ROOFLINE),
    }


def print_results(rows: list[dict]) -> None:
    """The side-by-side table."""
    headers = ["dtype", "pdserve variant", "batch", "pdserve ms/step", "pdserve tok/s"]
    headers += ["roofline ms/step", "pdserve % roofline", "llama.cpp tok/s"]
    headers += ["llama.cpp % roofline", "pdserve/llama.cpp", "vs first variant", "goal", "verdict"]
    table = []
    for r in rows:
        pct = [_pct(r["pdserve_roofline"]), r["llamacpp_tok_s"], _pct(r["llamacpp_roofline"])]
        speedup = f"{r['vs_first_variant']:.2f}x" if r["vs_first_variant"] else None
        table.append(
            [
                *(r["dtype"], r["variant"], r["batch"], r["pdserve_ms"], r["pdserve_tok_s"]),
                r["roofline_ms"],
                *pct,
                *(r["ratio"], speedup, r["goal"], r["verdict"]),
            ]
        )
    print(common.format_table(headers, table))


def _pct(value: float | None) -> str | None:
    """A fraction as a percentage, or None."""
    return None if value is None else f"{value:.0%}"


def describe(model_dir: Path, bandwidth: float, args: argparse.Namespace) -> dict:
    """Header sections: hardware (with measured bandwidth), model, workload, peers."""
    bytes_fp32 = weight_bytes_per_step(model_dir, "float32")
    peer = common.llamacpp_bin("llama-bench")
    return {
        "hardware": common.hardware_info()
        | {"load_avg_1m": round(common.machine_load(), 2)}
        | {"read_bandwidth_GB_s": round(bandwidth / 1e9, 1)},
        "model": common.model_info(model_dir)
        | {"weight_MB_read_per_step_fp32": round(bytes_fp32 / 1e6, 1)}
        | {"kv_KB_per_token_fp32": kv_bytes_per_token(model_dir, "float32") / 1e3},
        "workload": {
            "prompt_tokens": args.context,
            "decode_steps": f"{args.decode_steps} at batch 1, {args.batch_decode_steps} above",
            "batch_sizes": args.batch_sizes,
            "pdserve": "step = (t(max_tokens=1+N) − t(max_tokens=1)) / N, prompts prefilled once",
            "pdserve_variants": args.variants,
            "clock": "process CPU time, 1 thread" if args.cpu_time else "wall",
            "rounds": args.rounds,
            "roofline": "(weights except embedding + KV at mid context) ÷ read bandwidth "
            "(the higher of the readings before and after the run)",
        },
        "llama.cpp": {
            "binaries": str(peer.parent) if peer else "not built (skipped)",
            "kv_cache": "its default, f16 (an f32 or bf16 cache is slower in llama.cpp on CPU)",
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model folder (default: built-in model)")
    p.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    p.add_argument("--decode-steps", type=int, default=128, help="N decode steps at batch 1")
    p.add_argument("--batch-decode-steps", type=int, default=64, help="N at batch > 1")
    p.add_argument(
        "--batch-sizes", default="1,16,32", type=lambda s: [int(b) for b in s.split(",")]
    )
    p.add_argument("--repeats", type=int, default=3, help="best-of repeats at batch 1")
    p.add_argument(
        "--variants",
        default="auto",
        type=lambda s: s.split(","),
        help="pdserve builds side by side: BACKEND[@ISA][:unfused][:chunks256k], e.g. auto,auto:chunks256k",
    )
    p.add_argument("--rounds", type=int, default=1, help="turns over the variants (best of)")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time pdserve by process CPU time (needs --threads 1; llama.cpp is skipped)",
    )
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="pdserve token budget")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer")
    p.add_argument("--no-pdserve", action="store_true", help="peers and roofline only")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure bandwidth, then each dtype's pdserve and llama.cpp decode; print the table."""
    args = parse_args(argv)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time counts the process's CPU time: use --threads 1")
    args.no_llamacpp |= args.cpu_time  # llama.cpp's tools report wall time only
    common.set_threads(args.threads)
    model_dir = common.resolve_model_dir(args.model)
    bandwidth = max(measure_read_bandwidth(args.bandwidth_gib, 7) for _ in range(2))
    header = describe(model_dir, bandwidth, args)
    common.print_header("Decode step time: pdserve vs roofline vs llama.cpp", header)
    measured = []
    for dtype in args.dtypes:
        print(f"[{dtype}] measuring ...", flush=True)
        pd_steps = {} if args.no_pdserve else measure_pdserve(model_dir, dtype, args)
        measured.append((dtype, pd_steps, measure_llamacpp(model_dir, dtype, args)))
    # Load drifts during a run on a shared host: the roofline takes the better of the
    # bandwidths before and after (the higher one: never a flattering floor).
    after = max(measure_read_bandwidth(args.bandwidth_gib, 7) for _ in range(2))
    header["hardware"]["read_bandwidth_after_GB_s"] = round(after / 1e9, 1)
    print(f"read bandwidth before {bandwidth / 1e9:.1f} GB/s, after {after / 1e9:.1f} GB/s")
    bandwidth = max(bandwidth, after)
    rows = []
    for dtype, pd_steps, llama_tps in measured:
        rows += result_rows(model_dir, dtype, pd_steps, llama_tps, bandwidth, args)
    print()
    print_results(rows)
    common.write_json(args.json_out, header | {"results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
