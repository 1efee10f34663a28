"""`pdserve plan`: the command line of the planner (sim/plan.py).

    pdserve plan --profile FILE [--profile FILE2 ...] [--price-per-hour P ...]
                 [--workload NAME | --trace FILE] [--slo-ttft MS --slo-tpot MS]
                 [--budget-cores N | --budget-devices N | --budget-nodes N | --budget-per-hour $]
                 [--modes aggregated,disaggregated,auto] [--chunk-sizes 512,2048]
                 [--max-num-seqs 64] [--sizes 1,2] [--top 10] [--yaml-out best.yaml]

Prices are per unit-hour: one machine of a CPU profile, one node of a GPU profile
(`--price-per-device-hour` multiplies by the node's devices); one per profile, in order.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pdserve.errors import ConfigError


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="search layouts for a workload under SLOs")
    p.add_argument("--profile", action="append", required=True, help="repeatable")
    p.add_argument("--price-per-hour", type=float, action="append", default=None)
    p.add_argument("--price-per-device-hour", type=float, action="append", default=None)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--workload", default="random", help="workload name (default random)")
    source.add_argument("--trace", default=None, help="Mooncake-format JSONL (Poisson rates)")
    p.add_argument("--num-specs", type=int, default=400, help="distinct requests sampled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="model folder: exact prompt tokens")
    p.add_argument("--slo-ttft", type=float, default=None, help="ms (default: workload's)")
    p.add_argument("--slo-tpot", type=float, default=None, help="ms (default: workload's)")
    p.add_argument("--attainment", type=float, default=0.9)
    budget = p.add_argument_group("budget (default: one unit)")
    budget.add_argument("--budget-cores", type=int, default=None)
    budget.add_argument("--budget-devices", type=int, default=None)
    budget.add_argument("--budget-nodes", type=int, default=None)
    budget.add_argument("--budget-per-hour", type=float, default=None)
    space = p.add_argument_group("search space")
    space.add_argument("--modes", default="aggregated,disaggregated,auto")
    space.add_argument("--chunk-sizes", default="512,2048", help="max_num_batched_tokens")
    space.add_argument("--max-num-seqs", default="64")
    space.add_argument("--sizes", default=None, help="threads/devices per worker")
    space.add_argument("--kv-cache-memory-gib", type=float, default=None, help="CPU pools")
    space.add_argument("--min-duration", type=float, default=20.0, help="s per probe")
    space.add_argument("--max-requests", type=int, default=2000, help="per probe")
    space.add_argument("--verify", type=int, default=1, help="large units: plans re-checked whole")
    p.add_argument("--top", type=int, default=10, help="plans printed")
    p.add_argument("--yaml-out", default=None, help="write the best plan's serve YAML")
    p.add_argument("--json-out", default=None, help="write every plan as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from pdserve.sim import plan as planner
    from pdserve.sim.search import SearchSettings

    profiles = _profiles(args)
    specs, slo = _load(args)
    engine_args = {}
    if args.kv_cache_memory_gib is not None:
        engine_args["kv_cache_memory_gib"] = args.kv_cache_memory_gib
    from pdserve.config import EngineConfig

    space = planner.SearchSpace(
        modes=tuple(args.modes.split(",")),
        chunk_sizes=tuple(_ints(args.chunk_sizes)),
        max_num_seqs=tuple(_ints(args.max_num_seqs)),
        sizes=tuple(_ints(args.sizes)) if args.sizes else None,
        engine=EngineConfig(**engine_args),
    )
    budget = planner.Budget(
        args.budget_cores, args.budget_devices, args.budget_nodes, args.budget_per_hour
    )
    start = time.perf_counter()
    plans = planner.make_plans(
        profiles,
        specs,
        slo,
        budget,
        space,
        on_plan=lambda plan: print(f"  {_line(plan)}", flush=True),
        settings=SearchSettings(
            attainment=args.attainment,
            min_duration_s=args.min_duration,
            max_requests=args.max_requests,
            seed=args.seed,
        ),
        num_verified=args.verify,
    )
    print(
        f"\n{len(plans)} layouts in {time.perf_counter() - start:.1f} s; "
        f"SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms, {args.attainment:.0%}"
    )
    print(format_plans(plans[: args.top]))
    if any(p.is_estimate for p in plans):
        print("~: estimated from one worker's goodput per phase (not searched as a whole unit)")
    if not plans:
        return 1
    best = planner.launch_yaml(plans[0])
    print(f"\n# pdserve serve --config best.yaml  (x{plans[0].replicas} replicas)\n{best}")
    if args.yaml_out:
        Path(args.yaml_out).write_text(best, encoding="utf-8")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([plan_to_dict(p) for p in plans], indent=1))
    return 0


def _profiles(args: argparse.Namespace):
    from pdserve.sim.profile import Profile

    loaded = [Profile.load(path) for path in args.profile]
    prices: list[float | None] = [None] * len(loaded)
    for i, price in enumerate(args.price_per_hour or []):
        prices[i] = price
    for i, price in enumerate(args.price_per_device_hour or []):
        prices[i] = price * loaded[i].cores
    if len(args.price_per_hour or []) + len(args.price_per_device_hour or []) > len(loaded):
        raise ConfigError("price_per_hour", "one price per --profile at most")
    return list(zip(loaded, prices, strict=True))


def _load(args: argparse.Namespace):
    from pdserve.bench.types import SLO

    if args.trace:
        from pdserve.bench.trace import load_trace

        specs = load_trace(args.trace, max_requests=args.num_specs, seed=args.seed)
        default = None
    else:
        from pdserve.bench.workloads import get_workload

        workload = get_workload(args.workload)
        specs = workload.sample(args.num_specs, args.seed)
        default = workload.default_slo
    ttft = args.slo_ttft if args.slo_ttft is not None else (default and default.ttft_ms)
    tpot = args.slo_tpot if args.slo_tpot is not None else (default and default.tpot_ms)
    if ttft is None or tpot is None:
        raise ConfigError("slo", "give --slo-ttft and --slo-tpot (a trace has no defaults)")
    return specs, SLO(ttft, tpot)


def _line(plan) -> str:
    c = plan.candidate
    bound = ">=" if plan.is_lower_bound else ""
    return f"{_hardware(c.profile)}: {c.label}: {bound}{plan.unit_goodput:.3g} req/s per unit"


def format_plans(plans) -> str:
    header = (
        f"{'#':>3}  {'hardware':<18} {'layout':<52} {'unit req/s':>10} {'per dev':>8} "
        f"{'units':>6} {'total req/s':>11} {'$/1M out':>9}"
    )
    lines = [header]
    for i, plan in enumerate(plans, 1):
        cost = plan.cost_per_million_output_tokens
        bound = "~" if plan.is_estimate else ">=" if plan.is_lower_bound else ""
        lines.append(
            f"{i:>3}  {_hardware(plan.candidate.profile):<18} {plan.candidate.label:<52} "
            f"{bound + format(plan.unit_goodput, '.3g'):>10} {plan.goodput_per_device:>8.3g} "
            f"{plan.replicas:>6} {plan.goodput:>11.4g} "
            f"{'-' if cost is None else format(cost, '.4g'):>9}"
        )
    return "\n".join(lines)


def _hardware(profile) -> str:
    hw = profile.hardware
    name = hw.get("name") or hw.get("cpu_model") or "?"
    return f"{name[:12]} x{profile.cores}"


def plan_to_dict(plan) -> dict:
    from pdserve.sim.plan import launch_yaml

    return {
        "hardware": _hardware(plan.candidate.profile),
        "layout": plan.candidate.label,
        "unit_goodput": plan.unit_goodput,
        "is_lower_bound": plan.is_lower_bound,
        "is_estimate": plan.is_estimate,
        "goodput_per_device": plan.goodput_per_device,
        "replicas": plan.replicas,
        "goodput": plan.goodput,
        "output_throughput_per_unit": plan.output_throughput,
        "cost_per_million_output_tokens": plan.cost_per_million_output_tokens,
        "serve_yaml": launch_yaml(plan),
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]
