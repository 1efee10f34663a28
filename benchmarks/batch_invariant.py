"""The cost of batch-invariant mode: decode and prefill throughput against the default mode.

Two engines on the same model in one process — the default (oneDNN / OpenBLAS products,
SDPA prefill attention) and `batch_invariant=True` (the fixed-order product of
`kernels/gemm.c`, every token through the per-row attention kernel).

Measurements alternate between the two engines, each figure the best of `--repeats`.

- decode tok/s at each batch size: prompts of `--context` tokens are prefilled once; a step
  is (t(1 + N tokens) − t(1 token)) / N over the same prompts (both calls hit the prefix
  cache, so their prefill cancels out), and tok/s = batch / step;
- prefill tok/s: one fresh `--prefill-tokens` prompt (no cache hit) to its first token.

Usage: python benchmarks/batch_invariant.py [--threads 2] [--batch-sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import common


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: the built-in model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--context", type=int, default=128, help="prompt tokens of decode rows")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


class Engine:
    def __init__(self, model_dir, batch_invariant: bool, args: argparse.Namespace) -> None:
        from pdserve import LLM, SamplingParams

        self.params = SamplingParams
        self.llm = LLM(
            str(model_dir),
            num_threads=args.threads,
            max_num_seqs=max(args.batch_sizes),
            batch_invariant=batch_invariant,
        )
        vocab = common.load_config(model_dir)["vocab_size"]
        self.vocab = vocab
        self.prompts = common.random_prompts([args.context] * max(args.batch_sizes), vocab, 1)
        self.fresh = itertools.count(2)
        self._generate(self.prompts, 1)  # prefill once; warms the engine up too

    def _generate(self, prompts, max_tokens: int) -> float:
        inputs = [{"prompt_token_ids": p} for p in prompts]
        params = self.params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        seconds, _ = common.timed(lambda: self.llm.generate(inputs, params, use_tqdm=False))
        return seconds

    def decode_step(self, batch: int, steps: int) -> float:
        prompts = self.prompts[:batch]
        return (self._generate(prompts, 1 + steps) - self._generate(prompts, 1)) / steps

    def prefill(self, num_tokens: int) -> float:
        prompt = common.random_prompts([num_tokens], self.vocab, seed=next(self.fresh))
        return self._generate(prompt, 1)


def best_interleaved(engines: dict, measure, args: argparse.Namespace) -> dict[str, float]:
    """Each engine's fastest of `--repeats` measurements, taken in turns (default, invariant,
    default, ...) so that a change in the machine's load hits both alike."""
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(args.repeats):
        for name, engine in engines.items():
            best[name] = min(best[name], measure(engine))
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    model_dir = common.resolve_model_dir(args.model)
    common.print_header(
        "Batch-invariant mode vs default",
        {
            "hardware": common.hardware_info(),
            "model": common.model_info(model_dir),
            "workload": {**vars(args), "load_average_1min": common.machine_load()},
        },
    )
    engines = {"default": Engine(model_dir, False, args), "batch-invariant": Engine(model_dir, True, args)}  # fmt: skip
    results: dict[str, dict[str, float]] = {name: {} for name in engines}
    for batch in args.batch_sizes:
        steps = best_interleaved(
            engines, lambda e, b=batch: e.decode_step(b, args.decode_steps), args
        )
        for name, step in steps.items():
            results[name][f"decode tok/s, batch {batch}"] = batch / step
    prefills = best_interleaved(engines, lambda e: e.prefill(args.prefill_tokens), args)
    for name, seconds in prefills.items():
        results[name][f"prefill tok/s, {args.prefill_tokens}-token prompt"] = (
            args.prefill_tokens / seconds
        )
    rows = [
        [
            metric,
            value,
            results["batch-invariant"][metric],
            results["batch-invariant"][metric] / value,
        ]
        for metric, value in results["default"].items()
    ]
    print(common.format_table(["metric", "default", "batch-invariant", "ratio"], rows))
    common.write_json(args.json_out, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
