"""Prefill throughput with the last layer on sampled rows only vs on every row (baseline).

The model skips the last layer's attention, output projection and MLP on prompt tokens
whose output nothing reads (every prompt token but the last: see
`LlamaForCausalLM.forward`). The baseline computes the last layer on every row, as before
that change, by leaving the step's `output_rows` unset. Both run in one process on the same
engine, alternately round by round, over fresh prompts each round (nothing from the prefix
cache), `max_tokens=1` so the work is the prefill; tokens/s is the median over rounds (the
machine is shared). Greedy first tokens must agree between the two.

    .venv/bin/python benchmarks/prefill_last_layer.py [--lengths 256,2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common

from pdserve import LLM, SamplingParams
from pdserve.engine.model_runner import ModelRunner

# Tokens per round for each prompt length (whole prompts): enough for a few steps.
TOKENS_PER_ROUND = 8192


def run_round(llm: LLM, prompts: list[list[int]], every_row: bool) -> tuple[float, list[int]]:
    real = ModelRunner._prepare_output_rows
    if every_row:  # the baseline: no output rows, so every layer runs on every row
        ModelRunner._prepare_output_rows = lambda self, *args: None
    try:
        inputs = [{"prompt_token_ids": p} for p in prompts]
        params = SamplingParams(max_tokens=1, temperature=0.0)
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        ModelRunner._prepare_output_rows = real
    return elapsed, [o.outputs[0].token_ids[0] for o in outputs]


def measure(llm: LLM, length: int, vocab: int, rounds: int) -> dict:
    count = max(1, TOKENS_PER_ROUND // length)
    run_round(llm, common.random_prompts([length] * count, vocab, seed=10_000 + length), False)
    seconds: dict[str, list[float]] = {"sampled rows": [], "every row": []}
    for r in range(rounds):
        prompts = common.random_prompts([length] * count, vocab, seed=length * 100 + r)
        order = ("sampled rows", "every row") if r % 2 == 0 else ("every row", "sampled rows")
        firsts = {}
        for name in order:
            elapsed, firsts[name] = run_round(llm, prompts, name == "every row")
            seconds[name].append(elapsed)
        if firsts["sampled rows"] != firsts["every row"]:
            raise SystemExit(f"first tokens differ at length {length}, round {r}")
    tok_s = {name: count * length / statistics.median(s) for name, s in seconds.items()}
    return {
        "prompts_per_round": count,
        "sampled_rows_tok_s": tok_s["sampled rows"],
        "every_row_tok_s": tok_s["every row"],
        "speedup": tok_s["sampled rows"] / tok_s["every row"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: built-in)")
    parser.add_argument("--lengths", default="256,2048")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    common.set_threads(args.threads)
    model_dir = common.resolve_model_dir(args.model)
    lengths = [int(n) for n in args.lengths.split(",")]
    llm = LLM(str(model_dir), num_threads=args.threads, max_model_len=max(lengths) + 16)
    vocab = common.load_config(model_dir)["vocab_size"]
    common.print_header(
        "Prefill: last layer on sampled rows only vs on every row",
        {
            "hardware": common.hardware_info(),
            "model": common.model_info(model_dir),
            "workload": {
                "prompts": f"random token ids, lengths {lengths}, ~{TOKENS_PER_ROUND} "
                "tokens per round, fresh each round",
                "threads": args.threads,
                "rounds": f"{args.rounds}, alternating; median per round",
            },
        },
    )
    results = {n: measure(llm, n, vocab, args.rounds) for n in lengths}
    rows = [
        [n, r["prompts_per_round"], f"{r['every_row_tok_s']:.0f}",
         f"{r['sampled_rows_tok_s']:.0f}", f"{r['speedup']:.3f}x"]
        for n, r in results.items()
    ]  # fmt: skip
    print(
        common.format_table(
            ["prompt tokens", "prompts", "every row tok/s", "sampled rows tok/s", "ratio"], rows
        )
    )
    common.write_json(args.json_out, {"hardware": common.hardware_info(), "results": results})


if __name__ == "__main__":
    main()
