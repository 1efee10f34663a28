"""Products on CPU: torch (MKL) vs OpenBLAS vs oneDNN on prepacked weights vs the gemv kernel.

The evidence behind `pdserve/model/cpu_blas.py`'s backends. One "pass" is every product of a
forward step of the model — per layer q/k/v (fused), o, gate/up (fused) and down, then the
LM head — for `rows` tokens, the way a step runs them: one after another, weights streamed
from memory (the model's weights exceed the L2 and mostly the L3, as in serving).

- torch: `F.linear(x, W)` on the checkpoint's `[out, in]` weight (MKL in torch's CPU wheel);
- openblas: numpy's OpenBLAS on a row-major `[in, out]` copy (`x @ Wt`);
- onednn: `torch.ops.mkldnn._linear_pointwise` on the weight reordered once by
  `torch.ops.mkldnn._reorder_linear_weight`;
- gemv: pdserve's kernel (`kernels/gemv.c`) on float32 weights; gemv_bf16 on bfloat16
  weights (float32 activations), next to torch_bf16 (`F.linear` in bfloat16: native where
  the CPU has bf16 instructions, emulated elsewhere). `--isa avx2` builds the kernel
  without AVX-512 (the AVX2 path, on an AVX-512 host).
`--cpu-time` (with `--threads 1`) times each pass by the thread's CPU time instead of the
wall clock: on a host shared with other work it still counts only the time the pass ran
(memory stalls included), so libraries can be compared while others load the cores.
Every library gets the same threads (`--threads`, default 2). Time per pass is the median
of `--repeats` passes after a warm-up pass; GFLOPS = 2 x rows x parameters / time. Each
library's passes run back to back, after a pause, so that one library's idle threads
(OpenBLAS spins after a call, see pdserve/__init__.py; `common` applies the engine's
settings) never compete with the other's.

    .venv/bin/python benchmarks/cpu_gemm.py [--rows 1 2 8 32 256 2048] [--json-out F]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common
import numpy as np
import torch
import torch.nn.functional as F

from pdserve.model import cpu_malloc, kernels
from pdserve.model.kernels import gemv

KINDS = ("torch", "openblas", "onednn", "gemv", "torch_bf16", "gemv_bf16")


def model_shapes(config: dict) -> list[tuple[int, int]]:
    """(out, in) of every product of one forward pass, in order."""
    hidden = config["hidden_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    q, kv = heads * head_dim, kv_heads * head_dim
    layer = [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]
    return layer * config["num_hidden_layers"] + [(config["vocab_size"], hidden)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: built-in)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32, 256, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="thread CPU time; --threads 1")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--isa", default="native", choices=["native", "avx2"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time counts one thread's CPU time: use --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    if args.isa != "native":
        os.environ["PDSERVE_KERNELS_ISA"] = args.isa

    from threadpoolctl import threadpool_limits

    cpu_malloc.tune_malloc()  # as a worker does: outputs reuse heap memory, no page faults
    model_dir = common.resolve_model_dir(args.model)
    shapes = model_shapes(common.load_config(model_dir))
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, inp, generator=gen) * 0.02 for out, inp in shapes]
    rows_major = [np.ascontiguousarray(w.numpy().T) for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    kernels.set_num_threads(args.threads)
    weights_bf16 = [w.bfloat16() for w in weights]
    gemv_f32 = [gemv.PackedGemv.prepare(w) for w in weights]
    gemv_bf16 = [gemv.PackedGemv.prepare(w) for w in weights_bf16]
    params = sum(out * inp for out, inp in shapes)
    common.print_header(
        "float32 products on CPU: torch vs OpenBLAS vs oneDNN (prepacked)",
        {
            "hardware": common.hardware_info(),
            "model": common.model_info(model_dir),
            "workload": {
                "pass": f"{len(shapes)} products ({params / 1e6:.1f} M parameters)",
                "kernel_isa": args.isa
                + (" (AVX2 path on this host)" if args.isa == "avx2" else ""),
                "threads": args.threads,
                "clock": "thread CPU time" if args.cpu_time else "wall",
                "repeats": args.repeats,
            },
        },
    )

    def run_pass(kind: str, inputs: dict[int, torch.Tensor]) -> None:
        for i, (_, inp) in enumerate(shapes):
            x = inputs[inp]
            if kind == "torch":
                F.linear(x, weights[i])
            elif kind == "openblas":
                x.numpy() @ rows_major[i]
            elif kind == "onednn":
                torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")
            elif kind == "torch_bf16":
                F.linear(x.bfloat16(), weights_bf16[i])
            else:
                (gemv_f32 if kind == "gemv" else gemv_bf16)[i](x)

    kinds = args.kinds
    results = []
    for rows in args.rows:
        inputs = {inp: torch.randn(rows, inp, generator=gen) for _, inp in shapes}
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for kind in kinds:  # warm-up: page in, build oneDNN primitives for this size
            run_pass(kind, inputs)
        repeats = max(3, args.repeats if rows <= 256 else args.repeats // 3)
        for kind in kinds:
            time.sleep(0.5)  # let the previous library's threads go idle
            run_pass(kind, inputs)  # warm again: the other libraries ran in between
            for _ in range(repeats):
                start = clock()
                run_pass(kind, inputs)
                times[kind].append(clock() - start)
        medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        best = min(medians, key=medians.get)
        results.append({"rows": rows, "ms": medians, "best": best})
        gflops = {k: 2 * rows * params / (v / 1e3) / 1e9 for k, v in medians.items()}
        print(
            f"rows {rows:5d}: "
            + "  ".join(f"{k} {medians[k]:8.2f} ms ({gflops[k]:5.0f} GFLOPS)" for k in kinds),
            flush=True,
        )

    headers = ["rows", *(f"{k} ms" for k in kinds), "fastest"]
    table = [[r["rows"], *(r["ms"][k] for k in kinds), r["best"]] for r in results]
    print()
    print(common.format_table(headers, table))
    common.write_json(args.json_out, {"threads": args.threads, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
