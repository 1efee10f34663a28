"""8-bit weights (`quantization="int8"`): accuracy against the unquantised model, and speed.

Accuracy (`--part accuracy`, no timing: needs no bench lock), per model and variant
(bfloat16 for scale, int8 per group of 32, int8 per channel), against float32:
- greedy agreement: N prompts x M greedy tokens each, free running; the share of
  positions whose token equals float32's, prompts fully identical, first divergence;
- logit error, teacher-forced: the variant is fed float32's greedy continuation, so every
  step compares logits of the same context: max and mean |error|, the mean error relative
  to the logits' spread (std), top-1 agreement, and float32's median top-2 gap (how close
  the decisions are that an error can flip).
Models: the built-in model and a Hugging Face checkpoint written here by transformers
(random Llama, GQA; no download).

Products (`--part products`, under the bench lock): every layer's products at a range of
row counts through each int8 path (tiles, dequantised blocks, whole weight dequantised +
OpenBLAS) and float32's two libraries (oneDNN prepacked, OpenBLAS), taken in turns.

Speed (`--part speed`, run under the bench lock): decode step time at batch 1/16/32 for
float32, bfloat16 and int8 (activations float32), measured like `decode_roofline.py`
(step = (t(1 + N tokens) - t(1 token)) / N over cached prompts of CONTEXT tokens), the
batch-1 roofline counting int8's bytes (1 per weight + 4 per group of 32), and llama.cpp
on the same model converted to GGUF Q8_0 (and f32) when the peer is built.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import common
import decode_roofline
import torch

VARIANTS = {  # name -> (dtype, quantization, group size)
    "bfloat16": ("bfloat16", None, None),
    "int8-g32": ("float32", "int8", 32),
    "int8-row": ("float32", "int8", 1 << 30),  # one group per row: per channel
}


# ----------------------------------------------------------------------------- accuracy


def make_llm(model_dir: Path, dtype: str, quantization: str | None, group: int | None):
    from pdserve import LLM
    from pdserve.model import quant

    if group is not None:
        quant.GROUP_SIZE = group  # read when the model is quantised (at load)
    llm = LLM(
        model_dir,
        dtype=dtype,
        quantization=quantization,
        skip_tokenizer_init=True,
        kv_cache_memory_gib=0.25,  # plenty for these prompts; the machine is shared
    )
    quant.GROUP_SIZE = 32
    return llm


def record_logits(llm) -> dict[int, torch.Tensor]:
    """Float32 logits of every sampled row, keyed by the request's seed."""
    runner = llm.engine.core.runner
    sample, seen = runner.sampler, {}

    def recording(logits, rows):
        for i, row in enumerate(rows):
            seen[row.params.seed] = logits[i].float().clone()
        return sample(logits, rows)

    runner.sampler = recording
    return seen


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from pdserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def teacher_forced(llm, prompts, continuations) -> dict[int, torch.Tensor]:
    """Logits of the next token after each prompt + continuation[:j], keyed i * 1000 + j."""
    from pdserve import SamplingParams

    seen = record_logits(llm)
    inputs, params = [], []
    for i, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
        for j in range(len(cont)):
            inputs.append({"prompt_token_ids": prompt + cont[:j]})
            params.append(SamplingParams(temperature=0, max_tokens=1, seed=i * 1000 + j))
    llm.generate(inputs, params, use_tqdm=False)
    return seen


def agreement(reference: list[list[int]], got: list[list[int]]) -> dict:
    same = sum(
        a == b for r, g in zip(reference, got, strict=True) for a, b in zip(r, g, strict=True)
    )
    firsts = [
        next((j for j, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), None)
        for r, g in zip(reference, got, strict=True)
    ]
    diverged = sorted(f for f in firsts if f is not None)
    return {
        "same_tokens": same / sum(map(len, reference)),
        "identical_prompts": f"{firsts.count(None)}/{len(firsts)}",
        "first_divergence_min": diverged[0] if diverged else None,
        "first_divergence_median": diverged[len(diverged) // 2] if diverged else None,
    }


def logit_errors(reference: dict, got: dict) -> dict:
    ref = torch.stack([reference[k] for k in sorted(reference)])
    var = torch.stack([got[k] for k in sorted(reference)])
    err = (var - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    return {
        "logit_err_max": err.max().item(),
        "logit_err_mean": err.mean().item(),
        "err_mean/logit_std": (err.mean() / ref.std(dim=-1).mean()).item(),
        "top1_agree": (var.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "fp32_top2_gap_median": (top2[:, 0] - top2[:, 1]).median().item(),
    }


def accuracy(model_dir: Path, label: str, args) -> list[dict]:
    vocab = common.load_config(model_dir)["vocab_size"]
    lengths = common.seeded_uniform(args.prompts, 8, 96, seed=7)
    prompts = common.random_prompts(lengths, vocab, seed=11)
    llm = make_llm(model_dir, "float32", None, None)
    ref_tokens = greedy(llm, prompts, args.new_tokens)
    ref_logits = teacher_forced(llm, prompts, ref_tokens)
    del llm
    rows = []
    for name in args.variants:
        llm = make_llm(model_dir, *VARIANTS[name])
        row = {"model": label, "variant": name}
        row |= agreement(ref_tokens, greedy(llm, prompts, args.new_tokens))
        row |= logit_errors(ref_logits, teacher_forced(llm, prompts, ref_tokens))
        rows.append(row)
        print(f"  {label} {name}: {row}", flush=True)
        del llm
        gc.collect()
    return rows


def make_hf_checkpoint(folder: Path) -> Path:
    """A random Llama (GQA) saved by transformers itself: a Hugging Face folder."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(folder / "hf-llama")
    return folder / "hf-llama"


# ----------------------------------------------------------------------------- speed


def int8_weight_bytes(model_dir: Path) -> int:
    """Bytes an int8 decode step reads: 1 per weight + 4 per group of 32 (not the embedding)."""
    return decode_roofline.weight_bytes_per_step(model_dir, "float32") // 4 * 9 // 8


def speed(model_dir: Path, args) -> list[dict]:
    bandwidth = max(decode_roofline.measure_read_bandwidth(1.0, 7) for _ in range(2))
    print(f"  read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    mid_context = args.context + (args.decode_steps + 1) / 2
    kv_bytes = mid_context * decode_roofline.kv_bytes_per_token(model_dir, "float32")
    rows = []
    for name in args.speed_variants:
        dtype, quantization = ("float32", "int8") if name == "int8" else (name, None)
        steps = measure(model_dir, dtype, quantization, args)
        weights = (
            int8_weight_bytes(model_dir)
            if quantization
            else decode_roofline.weight_bytes_per_step(model_dir, dtype)
        )
        kv = kv_bytes if dtype == "float32" else kv_bytes / 2
        for batch, step in steps.items():
            floor = (weights + kv) / bandwidth if batch == 1 else None
            rows.append(
                {"engine": f"pdserve {name}", "batch": batch, "ms_per_step": step * 1e3}
                | {"tok_s": batch / step, "roofline": floor / step if floor else None}
            )
    for outtype in args.llamacpp_types:
        for batch, tps in llamacpp(model_dir, outtype, args).items():
            rows.append(
                {"engine": f"llama.cpp {outtype}", "batch": batch, "ms_per_step": None}
                | {"tok_s": tps, "roofline": None}
            )
    return rows


def measure(model_dir: Path, dtype: str, quantization: str | None, args) -> dict[int, float]:
    timer = decode_roofline.PdserveDecodeTimer(
        model_dir, dtype, max(args.batch_sizes), args, quantization=quantization
    )
    try:
        timer.prime()
        steps = {}
        for batch in args.batch_sizes:
            n = decode_roofline.decode_steps_for(batch, args)
            steps[batch] = timer.step_seconds(batch, n, args.repeats if batch == 1 else 1)
            print(f"  {dtype} {quantization} batch {batch}: {steps[batch] * 1e3:.2f} ms/step")
        return steps
    finally:
        timer.close()


def llamacpp(model_dir: Path, outtype: str, args) -> dict[int, float]:
    if common.llamacpp_bin("llama-bench") is None:
        return {}
    gguf = common.gguf_for(model_dir, outtype)
    if gguf is None:
        return {}
    results = decode_roofline.llamacpp_batched(gguf, args)
    if 1 in args.batch_sizes:
        results[1] = decode_roofline.llamacpp_batch1(gguf, args)
    return {b: v for b, v in sorted(results.items()) if v}


# ----------------------------------------------------------------------------- products


def products(model_dir: Path, args) -> list[dict]:
    """Every layer's products (not the head), each int8 path against float32's libraries."""
    import numpy as np

    from pdserve.model import cpu_blas, kernels, quant

    kernels.set_num_threads(args.threads)
    cpu_blas.set_num_threads(args.threads)
    cfg = common.load_config(model_dir)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    shapes = [(qkv, hidden), (hidden, qkv - 2 * cfg["num_key_value_heads"] * head_dim)]
    shapes += [(2 * inter, hidden), (hidden, inter)]
    mats = []  # distinct matrices per layer: nothing stays in cache between calls
    for _ in range(cfg["num_hidden_layers"]):
        for n, k in shapes:
            w = torch.randn(n, k) * 0.02
            packed = quant.PackedInt8(quant.quantize_int8(w), quant._kernel())
            onednn = torch.ops.mkldnn._reorder_linear_weight(w, None)
            mats.append((k, packed, onednn, np.ascontiguousarray(w.numpy().T)))
    big, rows_out = 1 << 62, []
    for rows in args.product_rows:
        x = {k: torch.randn(rows, k) for k in {k for k, *_ in mats}}

        def int8(blocked: int, dequantized: int, x=x):
            def run():
                quant.BLOCKED_MIN_ROWS, quant.DEQUANTIZED_MIN_ROWS = blocked, dequantized
                for k, packed, _, _ in mats:
                    packed(x[k], None)

            return run

        def onednn(x=x):
            for k, _, w, _ in mats:
                torch.ops.mkldnn._linear_pointwise(x[k], w, None, "none", [], "")

        def openblas(x=x):
            for k, _, _, w in mats:
                x[k].numpy() @ w

        paths = {"int8 tiles": int8(big, big), "int8 blocked": int8(1, big)}
        paths |= {"int8 dequantised+OpenBLAS": int8(big, 1)}
        paths |= {"fp32 oneDNN": onednn, "fp32 OpenBLAS": openblas}
        best = {name: 1e9 for name in paths}
        for _ in range(args.repeats):  # in turns: noise hits every path alike
            for name, fn in paths.items():
                best[name] = min(best[name], common.best_of(fn, 2))
        rows_out.append({"rows": rows} | {f"{k} ms": v * 1e3 for k, v in best.items()})
        print(f"  {rows_out[-1]}", flush=True)
    return rows_out


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["accuracy", "speed", "products"], required=True)
    p.add_argument(
        "--product-rows",
        default="1,4,16,32,64,512,2048",
        type=lambda s: [int(r) for r in s.split(",")],
    )
    p.add_argument("--model", default=None, help="HF model folder (default: built-in model)")
    p.add_argument("--no-hf", action="store_true", help="accuracy: skip the transformers model")
    p.add_argument("--variants", default=list(VARIANTS), type=lambda s: s.split(","))
    p.add_argument("--prompts", type=int, default=16, help="accuracy: N prompts")
    p.add_argument("--new-tokens", type=int, default=32, help="accuracy: M greedy tokens")
    p.add_argument("--speed-variants", default="float32,bfloat16,int8", type=lambda s: s.split(","))
    p.add_argument("--llamacpp-types", default="q8_0,f32", type=lambda s: s.split(","))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--batch-decode-steps", type=int, default=32)
    p.add_argument(
        "--batch-sizes", default="1,16,32", type=lambda s: [int(b) for b in s.split(",")]
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory-gib", type=float, default=0.5, help="speed: KV pool")
    p.add_argument("--json-out", default=None)
    # decode_roofline's timer also reads these; this script always times wall clock.
    p.set_defaults(cpu_time=False)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    model_dir = common.resolve_model_dir(args.model)
    header = {"hardware": common.hardware_info() | {"load_avg_1m": common.machine_load()}}
    header["model"] = common.model_info(model_dir)
    header["workload"] = {k: v for k, v in vars(args).items() if k != "json_out"}
    common.print_header(f"int8 weights: {args.part}", header)
    if args.part == "accuracy":
        rows = accuracy(model_dir, model_dir.name, args)
        if not args.no_hf:
            with tempfile.TemporaryDirectory() as tmp:
                rows += accuracy(make_hf_checkpoint(Path(tmp)), "hf-llama (transformers)", args)
    elif args.part == "products":
        rows = products(model_dir, args)
    else:
        rows = speed(model_dir, args)
    print()
    print(common.format_table(list(rows[0]), [list(r.values()) for r in rows]))
    common.write_json(args.json_out, header | {"results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
