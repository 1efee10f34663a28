"""Offline throughput: pdserve `LLM.generate` vs transformers `generate`, side by side.

Both engines get the same weights, dtype, thread count and prompts (seeded random token
ids). Transformers runs static batches (left padding, greedy); a batch generates as many
tokens as its longest request, so only each prompt's requested tokens count as useful.
pdserve gets every prompt in one call with `ignore_eos=True` and each prompt's own
`max_tokens`, so continuous batching can refill a slot as soon as a request finishes.

Each engine runs in its own child process (this script with `--worker`): neither inherits
the other's allocator state, thread pools or KV pool, and a crash in one still leaves the
other's numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import common
import torch

GOALS = {"uniform": 1.2, "mixed": 3.0}
ENGINES = ("pdserve", "hf")


@dataclass(frozen=True, slots=True)
class Workload:
    """Prompts (token ids) and each prompt's requested output length."""

    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    def describe(self) -> dict:
        """Counts and ranges for the report header."""
        ins = [len(p) for p in self.prompts]
        return {
            "num_prompts": len(self.prompts),
            "input_tokens": f"{sum(ins)} (min {min(ins)}, max {max(ins)})",
            "output_tokens": f"{sum(self.output_lens)} (min {min(self.output_lens)}, max {max(self.output_lens)})",
        }


def make_workload(name: str, vocab_size: int, seed: int) -> Workload:
    """`uniform`: 32 × 512 in / 128 out. `mixed`: 64 prompts, in U[16,1024], out U[8,512]."""
    if name == "uniform":
        input_lens, output_lens = [512] * 32, [128] * 32
    elif name == "mixed":
        input_lens = common.seeded_uniform(64, 16, 1024, seed)
        output_lens = common.seeded_uniform(64, 8, 512, seed + 1)
    else:
        raise ValueError(f"unknown workload {name!r}")
    return Workload(name, common.random_prompts(input_lens, vocab_size, seed + 2), output_lens)


# ----------------------------------------------------------------------------- pdserve


def run_pdserve(model_dir: Path, args: argparse.Namespace, workloads: list[Workload]) -> dict:
    """Time one `LLM.generate` call per workload after a short warm-up."""
    from pdserve import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=args.dtype, **_engine_kwargs(args))
    warm = [{"prompt_token_ids": p[:32]} for p in workloads[0].prompts[:2]]
    llm.generate(
        warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    return {w.name: _time_pdserve(llm, SamplingParams, w) for w in workloads}


def _engine_kwargs(args: argparse.Namespace) -> dict:
    """Engine limits given on the command line; the rest are pdserve's own defaults."""
    kwargs = {"num_threads": args.threads}
    kwargs |= {"enable_chunked_prefill": True, "enable_prefix_caching": True}
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return kwargs


def _time_pdserve(llm, sampling_params_cls, workload: Workload) -> dict:
    """All prompts in one call, each with its own max_tokens; count the tokens returned."""
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    params = [
        sampling_params_cls(max_tokens=n, temperature=0.0, ignore_eos=True)
        for n in workload.output_lens
    ]
    seconds, outs = common.timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    _progress(f"[pdserve] {workload.name}: {len(prompts)} prompts in one call: {seconds:.1f} s")
    got = [len(o.outputs[0].token_ids) for o in outs]
    useful = sum(min(g, n) for g, n in zip(got, workload.output_lens, strict=True))
    return {
        "seconds": seconds,
        "useful_tokens": useful,
        "computed_tokens": sum(got),
        "mismatched_lengths": sum(g != n for g, n in zip(got, workload.output_lens, strict=True)),
    }


# ----------------------------------------------------------------------------- transformers


def run_hf(model_dir: Path, args: argparse.Namespace, workloads: list[Workload]) -> dict:
    """Time static-batched greedy `generate` per workload after a short warm-up."""
    from transformers import AutoModelForCausalLM

    dtype = common.torch_dtype(args.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    warm = Workload("warm", [p[:32] for p in workloads[0].prompts[:2]], [4, 4])
    _time_hf(model, warm, batch_size=2)
    return {w.name: _time_hf(model, w, args.hf_batch_size) for w in workloads}


def _time_hf(model, workload: Workload, batch_size: int) -> dict:
    """Consecutive batches; each generates its longest request's length for every row."""
    seconds, computed = 0.0, 0
    for start in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[start : start + batch_size]
        new_tokens = max(workload.output_lens[start : start + batch_size])
        elapsed, out_len = common.timed(lambda p=prompts, n=new_tokens: _hf_batch(model, p, n))
        seconds += elapsed
        width = max(len(p) for p in prompts)
        _progress(
            f"[hf] {workload.name}: batch of {len(prompts)}, width {width}, {out_len} new: {elapsed:.1f} s"
        )
        computed += out_len * len(prompts)
    return {
        "seconds": seconds,
        "useful_tokens": sum(workload.output_lens),
        "computed_tokens": computed,
    }


def _hf_batch(model, prompts: list[list[int]], new_tokens: int) -> int:
    """Left-pad one batch and generate exactly `new_tokens` greedy tokens per row."""
    pad_id = model.config.pad_token_id or 0
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_id,
        )
    return out.shape[1] - width


# ----------------------------------------------------------------------------- driver


def _progress(message: str) -> None:
    """A progress line on stderr, so a long run shows where it is."""
    print(message, file=sys.stderr, flush=True)


def worker_main(args: argparse.Namespace) -> None:
    """Child process: run one engine over the workloads and write its raw timings."""
    common.set_threads(args.threads)
    model_dir = Path(args.model)
    vocab = common.load_config(model_dir)["vocab_size"]
    workloads = [make_workload(n, vocab, args.seed) for n in args.workloads]
    runner = run_pdserve if args.worker == "pdserve" else run_hf
    results = runner(model_dir, args, workloads)
    gc.collect()
    Path(args.json_out).write_text(json.dumps(results))


def spawn_worker(engine: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """Run one engine in a child process; its timings, or {"error": ...} if it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = Path(tmp.name)
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model_dir)]
    cmd += ["--dtype", args.dtype, "--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += ["--workloads", ",".join(args.workloads), "--hf-batch-size", str(args.hf_batch_size)]
    cmd += ["--max-num-seqs", str(args.max_num_seqs or 0)]
    cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens or 0)]
    cmd += ["--json-out", str(out)]
    print(f"[{engine}] running in a child process ...", flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        return {"error": f"{engine} child exited with code {proc.returncode}"}
    results = json.loads(out.read_text())
    out.unlink()
    return results


def tok_s(result: dict | None) -> float | None:
    """Useful output tokens per second, or None if the engine did not run."""
    if not result or "seconds" not in result:
        return None
    return result["useful_tokens"] / result["seconds"]


def result_rows(workloads: list[Workload], by_engine: dict[str, dict]) -> list[dict]:
    """One row per workload with both engines' numbers and the ratio."""
    rows = []
    for w in workloads:
        pd, hf = by_engine.get("pdserve", {}).get(w.name), by_engine.get("hf", {}).get(w.name)
        pd_tps, hf_tps = tok_s(pd), tok_s(hf)
        ratio = pd_tps / hf_tps if pd_tps and hf_tps else None
        rows.append(
            {
                "workload": w.name,
                "useful_out_tokens": sum(w.output_lens),
                "pdserve_s": pd and pd.get("seconds"),
                "pdserve_tok_s": pd_tps,
                "hf_s": hf and hf.get("seconds"),
                "hf_computed_tokens": hf and hf.get("computed_tokens"),
                "hf_tok_s": hf_tps,
                "ratio": ratio,
                "goal": GOALS[w.name],
                "verdict": common.goal_verdict(ratio, GOALS[w.name]),
                "pdserve_mismatched_lengths": pd and pd.get("mismatched_lengths"),
            }
        )
    return rows


def print_results(rows: list[dict]) -> None:
    """The side-by-side table: time and useful tok/s per engine and their ratio."""
    headers = ["workload", "useful out tok", "pdserve s", "pdserve tok/s", "HF s"]
    headers += ["HF computed out tok", "HF tok/s", "pdserve/HF", "goal", "verdict"]
    table = [
        [
            *(r["workload"], r["useful_out_tokens"], r["pdserve_s"], r["pdserve_tok_s"], r["hf_s"]),
            *(r["hf_computed_tokens"], r["hf_tok_s"], r["ratio"], f"≥{r['goal']}x", r["verdict"]),
        ]
        for r in rows
    ]
    print(common.format_table(headers, table))
    for r in rows:
        if r["pdserve_mismatched_lengths"]:
            print(
                f"WARNING: {r['workload']}: {r['pdserve_mismatched_lengths']} pdserve outputs "
                "differ from the requested length"
            )


def main_driver(args: argparse.Namespace) -> int:
    """Parent process: describe the run, spawn each engine, print the comparison."""
    common.set_threads(args.threads)
    model_dir = common.resolve_model_dir(args.model)
    vocab = common.load_config(model_dir)["vocab_size"]
    workloads = [make_workload(n, vocab, args.seed) for n in args.workloads]
    header = {
        "hardware": common.hardware_info() | {"load_avg_1m": round(common.machine_load(), 2)},
        "model": common.model_info(model_dir) | {"dtype": args.dtype},
        "engines": {
            "pdserve": f"LLM.generate, one call, ignore_eos, {_engine_kwargs(args)}",
            "hf": f"transformers generate, static batches of {args.hf_batch_size}, left padding, greedy",
            "isolation": "each engine in its own child process, run one after the other",
        },
    }
    header |= {f"workload {w.name}": w.describe() | {"seed": args.seed} for w in workloads}
    common.print_header("Offline throughput: pdserve vs transformers", header)
    by_engine = {e: spawn_worker(e, model_dir, args) for e in args.engines}
    rows = result_rows(workloads, by_engine)
    print()
    print_results(rows)
    errors = {e: r["error"] for e, r in by_engine.items() if "error" in r}
    for engine, error in errors.items():
        print(f"ERROR: {engine}: {error} (its traceback is above)")
    common.write_json(args.json_out, header | {"results": rows, "raw": by_engine})
    return 1 if errors else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; --worker is internal (the parent uses it to start each engine)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model folder (default: built-in model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both engines")
    p.add_argument("--workloads", default="uniform,mixed", type=lambda s: s.split(","))
    p.add_argument("--engines", default="pdserve,hf", type=lambda s: s.split(","))
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument(
        "--max-num-seqs", type=int, default=None, help="pdserve limit (default: its own)"
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="pdserve token budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=ENGINES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for engine in args.engines:
        if engine not in ENGINES:
            p.error(f"unknown engine {engine!r}; choose from {ENGINES}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the parent driver, or one engine's child process."""
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    return main_driver(args)


if __name__ == "__main__":
    sys.exit(main())
