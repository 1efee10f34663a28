"""Prefill with row buckets (`cpu_blas.bucket_rows`) vs without: speed, heap, shapes.

A prefill worker's heap grew through a soak because oneDNN caches a primitive per product
shape and every step brought a new row count. Row buckets pad library products to ~60
shapes. This measures what that costs and what it saves, each setting in its own process
(`PDSERVE_PAD_ROWS=1` / `0`; RSS is per process), on the built-in model:

- a pass over groups of 8 prompts of random lengths (16-255 tokens, as `soak.py` sends),
  `max_tokens=1`, one group per `generate` call, so each step is a new row count: prefill
  tokens/s and RssAnon before/after (and after `malloc_trim(0)`);
- the same prompt lengths again (fresh token ids, so no prefix-cache hits): every shape has
  been seen, so this pass times the padding itself against cached primitives;
- the distinct row counts that reached oneDNN / torch's own path.

`--speed` measures the padding's cost alone, robust to a shared host: one process, the
same groups run padded and unpadded alternately (the `pad_rows` flag of every product
switched between them), after a pass that built every shape for both; the ratio of
summed times, and the median of the per-group ratios.

    .venv/bin/python benchmarks/prefill_buckets.py [--groups 150] [--threads 2] [--speed]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common

GROUP = 8


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_pass(llm, lengths: list[int], vocab: int, seed: int) -> tuple[float, int, list[int]]:
    from pdserve import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0)
    firsts: list[int] = []
    elapsed = 0.0
    for g in range(0, len(lengths), GROUP):
        prompts = common.random_prompts(lengths[g : g + GROUP], vocab, seed=seed + g)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed += time.perf_counter() - start
        firsts += [o.outputs[0].token_ids[0] for o in outputs]
    return elapsed, sum(lengths), firsts


def child(args: argparse.Namespace) -> dict:
    """One setting, in this process: the passes above, as a JSON-able dict."""
    from pdserve import LLM
    from pdserve.model import cpu_blas

    rows_seen: set[int] = set()
    real_onednn, real_linear = cpu_blas.CpuMatmul._onednn, cpu_blas.F.linear

    def onednn(self, x, bias):
        rows_seen.add(x.shape[0])
        return real_onednn(self, x, bias)

    def linear(x, weight, bias=None):
        rows_seen.add(x.shape[0])
        return real_linear(x, weight, bias)

    cpu_blas.CpuMatmul._onednn = onednn
    cpu_blas.F.linear = linear
    llm = LLM(num_kv_blocks=512, num_threads=args.threads, enable_prefix_caching=False)
    vocab = llm.engine.core.runner.model_config.vocab_size
    lengths = common.seeded_uniform(GROUP * args.groups, 16, 255, seed=7)
    run_pass(llm, common.seeded_uniform(4 * GROUP, 16, 255, seed=1), vocab, seed=0)  # warm-up
    rows_seen.clear()
    before = rss_anon_mib()
    first_s, tokens, firsts = run_pass(llm, lengths, vocab, seed=1000)
    after = rss_anon_mib()
    again_s, _, _ = run_pass(llm, lengths, vocab, seed=900_000)
    after_again = rss_anon_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {
        "pad_rows": cpu_blas.pads_rows(),
        "prefill_tok_s_new_shapes": tokens / first_s,
        "prefill_tok_s_seen_shapes": tokens / again_s,
        "rss_anon_mib": [before, after, after_again, rss_anon_mib()],
        "distinct_rows": len(rows_seen),
        "max_rows": max(rows_seen, default=0),
        "first_tokens": firsts,
    }


def speed(args: argparse.Namespace) -> None:
    """The padding's cost with every primitive built: padded and unpadded, alternately."""
    import statistics

    from pdserve import LLM

    llm = LLM(num_kv_blocks=512, num_threads=args.threads, enable_prefix_caching=False)
    model = llm.engine.core.runner.model
    products = [m.cpu_mm for m in model.modules() if getattr(m, "cpu_mm", None) is not None]
    products.append(model.lm_head_mm)
    vocab = llm.engine.core.runner.model_config.vocab_size
    lengths = common.seeded_uniform(GROUP * args.groups, 16, 255, seed=7)
    groups = [lengths[g : g + GROUP] for g in range(0, len(lengths), GROUP)]
    times: dict[bool, list[float]] = {True: [], False: []}
    for measured in (False, True):  # the first round builds every shape for both
        for i, group in enumerate(groups):
            order = (True, False) if i % 2 == 0 else (False, True)
            for pad in order:
                for mm in products:
                    mm.pad_rows = pad
                elapsed, _, _ = run_pass(llm, group, vocab, seed=i * 7919 + measured * 13 + pad)
                if measured:
                    times[pad].append(elapsed)
    tokens = sum(lengths)
    ratios = [a / b for a, b in zip(times[True], times[False], strict=True)]
    print(
        common.format_table(
            ["rows", "prefill tok/s (all shapes built)"],
            [["buckets", tokens / sum(times[True])], ["exact rows", tokens / sum(times[False])]],
        )
    )
    print(f"time padded / unpadded: {sum(times[True]) / sum(times[False]):.3f} (sums), ", end="")
    print(f"{statistics.median(ratios):.3f} (median of {len(ratios)} groups)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=150, help="groups of 8 prompts per pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", action="store_true", help="the padding's cost alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.speed:
        print(f"load average before: {common.machine_load():.2f}")
        speed(args)
        print(f"load average after: {common.machine_load():.2f}")
        return
    results = {}
    load_before = common.machine_load()
    for pad in ("1", "0"):
        env = {**os.environ, "PDSERVE_PAD_ROWS": pad}
        cmd = [sys.executable, __file__, "--child", "--groups", str(args.groups)]
        cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results["buckets" if pad == "1" else "exact rows"] = json.loads(out.splitlines()[-1])
    on, off = results["buckets"], results["exact rows"]
    same = sum(a == b for a, b in zip(on.pop("first_tokens"), off.pop("first_tokens"), strict=True))
    common.print_header(
        "Prefill row buckets",
        {"hardware": common.hardware_info(), "load": {"before": load_before}},
    )
    rows = [
        [
            name,
            r["distinct_rows"],
            r["max_rows"],
            r["prefill_tok_s_new_shapes"],
            r["prefill_tok_s_seen_shapes"],
            " -> ".join(f"{v:.0f}" for v in r["rss_anon_mib"]),
        ]
        for name, r in results.items()
    ]
    headers = ["rows", "distinct M", "max M", "tok/s pass 1", "tok/s pass 2", "RssAnon MiB"]
    print(common.format_table(headers, rows))
    print(f"greedy first tokens equal: {same} of {GROUP * args.groups}")
    print(f"load average after: {common.machine_load():.2f}")
    common.write_json(args.json_out, {"results": results, "same_first_tokens": same})


if __name__ == "__main__":
    main()
