"""Sampler cost per decode step: pdserve's sampler vs the one it replaced (baseline).

Times `Sampler()(logits, rows)` on `[batch, vocab]` float32 logits (the built-in model's
vocabulary, 32000, at batch 32 by default) for the sampling settings clients send: greedy,
temperature 1 (the OpenAI API's default), top_p 0.9, top_k 50, and both filters, seeded
and unseeded rows. The baseline is the previous sampler's random path, kept below
(`baseline_sample`) so the comparison survives commits: an exponential race (argmax p / E
with E ~ Exp(1), a vocabulary of exponential noise per row) after a full-row sort for
top-k / top-p. Both run alternately round by round on the same logits; per-call time is the
median over rounds (the machine is shared). The decode step it is set against is
`decode_roofline.py`'s (~30 ms at batch 32 on the Zen 4 host).

    .venv/bin/python benchmarks/sampler.py [--batch 32] [--vocab 32000] [--json-out F]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch

from pdserve.engine.sampler import Sampler, SamplingRow
from pdserve.sampling_params import SamplingParams

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature 1": {},
    "temperature 1, seeded": {"seed": 7},
    "top_p 0.9": {"top_p": 0.9},
    "top_k 50": {"top_k": 50},
    "top_k 50 + top_p 0.9": {"top_k": 50, "top_p": 0.9},
}


def baseline_sample(logits: torch.Tensor, params: list[SamplingParams], generator) -> list[int]:
    """The replaced random path (git 803f783^): sort-based filters, exponential race."""
    temperature = torch.tensor([p.temperature for p in params]).unsqueeze(1)
    sub = logits / temperature
    if any(p.top_k > 0 for p in params) or any(p.top_p < 1.0 for p in params):
        vocab = sub.shape[-1]
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params]).unsqueeze(1)
        remove |= torch.arange(vocab).unsqueeze(0) >= top_k
        top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        remove |= probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        sub = torch.empty_like(sub).scatter_(-1, order, sorted_logits)
    probs = torch.softmax(sub, dim=-1)
    noise = torch.empty_like(probs)
    for j in range(len(params)):
        noise[j].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1).tolist()


def measure(logits: torch.Tensor, settings: dict, rounds: int) -> dict:
    params = SamplingParams(**settings)
    rows = [SamplingRow(params, 5) for _ in range(logits.shape[0])]
    sampler, generator = Sampler(0), torch.Generator().manual_seed(0)
    calls = {
        "new": lambda: sampler(logits.clone(), rows),
        "old": (lambda: baseline_sample(logits.clone(), [params] * len(rows), generator))
        if not params.is_greedy
        else (lambda: sampler(logits.clone(), rows)),  # greedy did not change
    }
    times = {name: [] for name in calls}
    for name in calls:
        calls[name]()  # warm-up: kernel build, allocator
    for r in range(rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    old, new = (statistics.median(times[n]) for n in ("old", "new"))
    return {"old_ms": old * 1e3, "new_ms": new * 1e3, "speedup": old / new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    common.set_threads(args.threads)
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0)) * 3
    common.print_header(
        "Sampler cost per step: current vs the exponential race + sort it replaced",
        {
            "hardware": common.hardware_info(),
            "workload": {
                "logits": f"[{args.batch}, {args.vocab}] float32, randn x 3",
                "threads": args.threads,
                "rounds": f"{args.rounds}, old and new alternating; median per call",
            },
        },
    )
    results = {name: measure(logits, s, args.rounds) for name, s in SETTINGS.items()}
    rows = [
        [name, f"{r['old_ms']:.2f}", f"{r['new_ms']:.2f}", f"{r['speedup']:.1f}x"]
        for name, r in results.items()
    ]
    print(common.format_table(["settings", "old ms", "new ms", "old/new"], rows))
    common.write_json(args.json_out, {"hardware": common.hardware_info(), "results": results})


if __name__ == "__main__":
    main()
