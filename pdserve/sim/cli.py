"""`pdserve profile`, `pdserve sim` and `pdserve plan`: the command lines of `sim/`.

    pdserve profile [--quick] [--threads 1,2] --out FILE        measure this machine
    pdserve profile --analytic H100 [--model DIR] [--sizes 1,2,4,8] --out FILE
    pdserve sim --profile FILE [layout: --config serve.yaml, --mode, --prefill-workers, ...]
                [load: pdserve bench run's flags] [--out run.json] [--html report.html]
    pdserve plan --profile FILE [--workload NAME | --trace FILE] [--slo-ttft --slo-tpot]
                 [--budget-cores N | --budget-devices N | --budget-per-hour $] ...

`add_sim_parsers(subparsers)` is the whole hook into `pdserve/cli.py`. `pdserve sim` takes
the load flags of `pdserve bench run` (its parser helpers, so they cannot drift apart)
and the layout flags of `pdserve serve` (the same names, and `--config` reads the same
YAML), and writes the same run JSON / HTML. Heavy modules load inside the commands.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# `pdserve serve` flags that describe a layout; the rest (ports, hosts, keys) mean nothing
# to a simulation.
LAYOUT_FLAGS = (
    "mode",
    "prefill_workers",
    "decode_workers",
    "mixed_workers",
    "threads_per_worker",
    "kv_backend",
    "auto_local_prefill_tokens",
    "routing_policy",
    "kv_aware_prefill_weight",
    "kv_aware_queue_weight",
    "kv_aware_running_weight",
    "kv_aware_usage_weight",
    "kv_aware_load_margin",
)
ENGINE_LAYOUT_FLAGS = (
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_memory_gib",
    "num_kv_blocks",
    "block_size",
)


def add_sim_parsers(subparsers: argparse._SubParsersAction) -> None:
    profile = subparsers.add_parser("profile", help="measure step costs for the simulator")
    profile.add_argument("--out", required=True, help="profile file (.json, or .yaml)")
    profile.add_argument("--quick", action="store_true", help="coarse grid (~30 s)")
    profile.add_argument("--threads", default=None, help="thread counts (default: 1,cores)")
    profile.add_argument("--model", default=None, help="HF model folder (default: built-in)")
    profile.add_argument(
        "--analytic", default=None, help="no measuring: a roofline for A100|H100|H200|L40S|FILE"
    )
    profile.add_argument("--dtype", default=None, help="analytic: weights/KV dtype (bfloat16)")
    profile.add_argument("--sizes", default="1,2,4,8", help="analytic: devices per worker")
    profile.add_argument(
        "--merge", nargs="+", default=None, help="no measuring: the fastest of these profiles"
    )
    profile.add_argument(
        "--frontend",
        default=None,
        help="front-end CPU per request and per token from benchmarks/frontend_cost.py "
        "--json-out (router + client)",
    )
    profile.set_defaults(func=cmd_profile)

    sim = subparsers.add_parser("sim", help="simulate a deployment under bench load")
    sim.add_argument("--profile", required=True, help="from `pdserve profile`")
    add_layout_args(sim)
    from pdserve.bench.cli import _add_common_args

    _add_common_args(sim)
    load = sim.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="requests/s (default: all at once)")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: in flight")
    sim.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson")
    sim.add_argument(
        "--background-load",
        type=float,
        default=0.0,
        help="threads of other programs busy on the machine (a shared host), e.g. its load "
        "average before the run",
    )
    sim.set_defaults(func=cmd_sim)

    from pdserve.sim.plan_cli import add_plan_parser

    add_plan_parser(subparsers)


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    from pdserve.serve_flags import ENGINE_FLAGS, SERVE_FLAGS

    group = parser.add_argument_group("layout (as pdserve serve)")
    group.add_argument("--config", default=None, help="pdserve serve YAML")
    for name in LAYOUT_FLAGS:
        kind, help_text = SERVE_FLAGS[name]
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    group.add_argument(
        "--no-kv-layerwise", dest="kv_layerwise", action="store_const", const=False, default=None
    )
    for name in ENGINE_LAYOUT_FLAGS:
        group.add_argument(
            "--" + name.replace("_", "-"), dest=f"engine_{name}", type=ENGINE_FLAGS[name]
        )


def serve_config(args: argparse.Namespace):
    """The `ServeConfig` `pdserve serve` would build from the same YAML and flags."""
    from pdserve.serve_config import ServeConfig

    data = _read_yaml(args.config) if args.config else {}
    engine = dict(data.get("engine") or {})
    for name in LAYOUT_FLAGS:
        if getattr(args, name, None) is not None:
            data[name] = getattr(args, name)
    if args.kv_layerwise is not None:
        data["kv_layerwise"] = args.kv_layerwise
    for name in ENGINE_LAYOUT_FLAGS:
        if getattr(args, f"engine_{name}", None) is not None:
            engine[name] = getattr(args, f"engine_{name}")
    return ServeConfig.from_dict({**data, "engine": engine})


def _read_yaml(path: str) -> dict:
    import yaml

    from pdserve.errors import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError("config", f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("engine") or {}, dict):
        raise ConfigError("config", f"{path} must hold a mapping of pdserve serve settings")
    return data


def cmd_profile(args: argparse.Namespace) -> int:
    from pdserve.sim.profile import format_profile

    if args.merge:
        from pdserve.sim.measure import merge_fastest
        from pdserve.sim.profile import Profile

        profile = merge_fastest([Profile.load(path) for path in args.merge])
    elif args.analytic:
        profile = _analytic(args)
    else:
        import os

        from pdserve.sim.measure import measure_profile

        cores = os.cpu_count() or 1
        threads = _ints(args.threads) if args.threads else sorted({1, cores})
        start = time.perf_counter()
        profile = measure_profile(threads, quick=args.quick, model=args.model)
        print(f"measured in {time.perf_counter() - start:.0f} s")
    if args.frontend:
        profile = _with_frontend(profile, args.frontend)
    profile.save(args.out)
    print(format_profile(profile))
    print(f"wrote {args.out}")
    return 0


def _with_frontend(profile, path: str):
    """The profile with the front end's CPU costs measured by benchmarks/frontend_cost.py
    (the router's and the client's, which share the cores with the workers)."""
    import dataclasses
    import json
    from pathlib import Path

    from pdserve.errors import ConfigError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        per_request = data["router_s_per_request"] + data["client_s_per_request"]
        per_token = data["router_s_per_token"] + data["client_s_per_token"]
        # the router's cost per step message (one per worker step), when measured
        per_step = data.get("router_s_per_step", 0.0) + data.get("client_s_per_step", 0.0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("frontend", f"{path}: not a frontend_cost.py result ({e})") from None
    return dataclasses.replace(
        profile,
        frontend_s_per_request=max(0.0, per_request),
        frontend_s_per_token=max(0.0, per_token),
        frontend_s_per_step=max(0.0, per_step),
        notes=(*profile.notes, f"front-end costs from {Path(path).name}"),
    )


def _analytic(args: argparse.Namespace):
    from pdserve.config import ModelConfig
    from pdserve.model.builtin import builtin_model_dir, ensure_builtin_model
    from pdserve.sim.analytic import analytic_profile
    from pdserve.sim.hardware import get_accelerator

    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = builtin_model_dir()
        if not (model_dir / "config.json").exists():
            model_dir = ensure_builtin_model(progress=True)
    config = ModelConfig.from_pretrained(model_dir)
    hardware = get_accelerator(args.analytic)
    sizes = tuple(_ints(args.sizes))
    return analytic_profile(config, model_dir.name, hardware, args.dtype or "bfloat16", sizes)


def cmd_sim(args: argparse.Namespace) -> int:
    from pdserve.bench import metrics
    from pdserve.bench.cli import (
        _arrival,
        _config,
        _num_requests,
        _num_specs,
        _slo,
        _write,
        load_specs,
    )
    from pdserve.sim.profile import Profile
    from pdserve.sim.run import simulate
    from pdserve.sim.tokens import PromptEncoder

    profile = Profile.load(args.profile)
    serve = serve_config(args)
    num_requests = _num_requests(args)
    specs, default_slo = load_specs(args, _num_specs(args, num_requests))
    slo = _slo(args, default_slo)
    encoder = PromptEncoder(_tokenizer(args.tokenizer))
    config = _config(args, slo) | {
        "profile": args.profile,
        "profile_kind": profile.kind,
        "layout": layout_summary(serve),
    }
    start = time.perf_counter()
    result = simulate(
        serve,
        profile,
        specs,
        _arrival(args),
        num_requests=num_requests,
        duration_s=args.duration,
        seed=args.seed,
        encoder=encoder,
        config=config,
        background_load=args.background_load,
    )
    wall = time.perf_counter() - start
    result.config["sim_wall_s"] = round(wall, 4)
    summary = metrics.summarize(result, slo, args.price_per_hour)
    print(metrics.format_summary(summary, result.config))
    speed = result.duration_s / wall if wall > 0 else float("inf")
    print(f"simulated {result.duration_s:.2f} s in {wall:.3f} s ({speed:.0f}x real time)")
    if args.out:
        _write(args.out, metrics.to_json(result, summary))
    if args.html:
        from pdserve.bench.report import write_html

        write_html(args.html, [(args.label or "sim", result, summary)])
        print(f"report: {args.html}")
    return 0


def layout_summary(serve) -> dict:
    counts = serve.worker_counts()
    return {
        "mode": serve.mode,
        **{f"{role}_workers": n for role, n in counts.items() if n},
        "threads_per_worker": serve.threads_per_worker,
        "max_num_batched_tokens": serve.engine.max_num_batched_tokens,
        "max_num_seqs": serve.engine.max_num_seqs,
        "kv_cache_memory_gib": serve.engine.kv_cache_memory_gib,
    }


def _tokenizer(path: str | None):
    if not path:
        return None
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]
