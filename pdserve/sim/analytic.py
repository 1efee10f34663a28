"""Analytic profiles: a `Profile` computed from a model's shape and a hardware description,
for hardware one does not have (ESTIMATES until `pdserve profile` runs there).

The same `StepCost` terms as a measured profile (sim/cost_model.py), each from a roofline
bound, for a worker of `p` devices in tensor parallel:

- `tokens(N)`: the larger of reading the weights once (bytes / (bandwidth x efficiency))
  and computing them (2 x params x N FLOPs / (peak x efficiency)), split over p devices,
  plus two all-reduces of N x hidden activations per layer over the device link (ring:
  2 (p-1)/p of the bytes) when p > 1. Evaluated at powers of two and interpolated, so the
  weight-bound plateau and the compute-bound slope both show.
- `row_s`: one more row through lm_head (2 x vocab x hidden FLOPs).
- `prefill_attention_s`: 4 x layers x heads x head_dim FLOPs per (query, context) pair.
- `decode_attention_s`: a context token's KV read once (kv bytes per token / bandwidth).
- `step_overhead_s`: the host's scheduling per step (from the description).

KV hand-over: `shm` stands for the device link inside a node, `tcp`/`nixl` for the
network between nodes (`Accelerator.network_bytes_per_s`).
"""

from __future__ import annotations

import datetime
from dataclasses import asdict

from pdserve.config import ModelConfig
from pdserve.sim.cost_model import StepCost
from pdserve.sim.hardware import Accelerator
from pdserve.sim.profile import ITEMSIZE, Profile, TransferCost, model_facts

KNOTS = tuple(2**i for i in range(15))  # 1 .. 16384 tokens per step
LINK_LATENCY_S = 10e-6


def analytic_step_cost(model: dict, hw: Accelerator, num_devices: int) -> StepCost:
    item = ITEMSIZE[model["dtype"]]
    hidden, layers, vocab = model["hidden_size"], model["num_layers"], model["vocab_size"]
    body = model["num_params"] - vocab * hidden * (1 if model["tie_word_embeddings"] else 2)
    flops = hw.peak_flops * hw.compute_efficiency * num_devices
    bandwidth = hw.memory_bytes_per_s * hw.bandwidth_efficiency * num_devices
    lm_head_read = vocab * hidden * item / bandwidth  # one sampled row per step at least

    def tokens(n: int) -> float:
        dense = max(body * item / bandwidth, 2 * body * n / flops)
        return dense + lm_head_read + _all_reduce(n * hidden * item, layers, hw, num_devices)

    heads_dim = model["num_heads"] * model["head_dim"]
    return StepCost(
        token_knots=KNOTS,
        token_seconds=tuple(tokens(n) for n in KNOTS),
        row_s=2 * vocab * hidden / flops,
        prefill_attention_s=4 * layers * heads_dim / flops,
        decode_attention_s=model["kv_bytes_per_token"] / bandwidth,
        step_overhead_s=hw.step_overhead_s,
    )


def _all_reduce(num_bytes: int, num_layers: int, hw: Accelerator, num_devices: int) -> float:
    if num_devices == 1:
        return 0.0
    ring = 2 * (num_devices - 1) / num_devices * num_bytes / hw.device_link_bytes_per_s
    return 2 * num_layers * (ring + LINK_LATENCY_S)


def analytic_profile(
    config: ModelConfig,
    name: str,
    hw: Accelerator,
    dtype: str = "bfloat16",
    sizes: tuple[int, ...] = (1, 2, 4, 8),
) -> Profile:
    model = model_facts(config, name, dtype)
    hardware = {"device": "gpu", **asdict(hw)}
    return Profile(
        kind="analytic",
        hardware=hardware,
        model=model,
        costs={p: analytic_step_cost(model, hw, p) for p in sizes},
        transfer={
            "shm": TransferCost(LINK_LATENCY_S, hw.device_link_bytes_per_s),
            "tcp": TransferCost(5 * LINK_LATENCY_S, hw.network_bytes_per_s),
            "nixl": TransferCost(5 * LINK_LATENCY_S, hw.network_bytes_per_s),
        },
        ipc_latency_s=5e-5,
        cores=hw.devices_per_node,
        contention=1.0,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        notes=(
            f"ESTIMATE: roofline from the {hw.name} datasheet ({hw.source}) with assumed "
            f"efficiencies (compute {hw.compute_efficiency}, bandwidth "
            f"{hw.bandwidth_efficiency}, {hw.step_overhead_s * 1e3:g} ms per step); replace "
            "with `pdserve profile` on that hardware",
        ),
    )
