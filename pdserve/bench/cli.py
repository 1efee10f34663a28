"""`pdserve bench`: the command line of the benchmark tools.

    pdserve bench run      --url URL [--workload NAME | --trace FILE | --phases FILE]
                           [--rate R [--burstiness B] | --concurrency C]
                           [--num-requests N | --duration S] [--slo-ttft MS --slo-tpot MS]
                           [--price-per-hour P] [--out FILE.json]
    pdserve bench goodput  (the same, without --rate/--concurrency) [--attainment 0.9] [--cores N]
    pdserve bench compare  A.json B.json ... [--html FILE]
    pdserve bench sweep    sweep.yaml ...

`add_bench_parser(subparsers)` is the whole hook into `pdserve/cli.py`. Everything heavy
(aiohttp, numpy, workloads, report plots) is imported inside the commands, so
`pdserve --help` stays instant; `compare` and `sweep` live in `bench/report.py` and
`bench/sweep.py` and are imported only when run. A workload's default SLOs apply when
`--slo-*` is not given; `--model` defaults to the first id of the server's `/v1/models`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from pdserve.bench.types import SLO, RequestSpec
from pdserve.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_NUM_REQUESTS = 100
SPECS_FOR_DURATION = 1000  # requests sampled for a --duration run; cycled beyond that


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible server")
    commands = bench.add_subparsers(dest="bench_command", required=True)

    run = commands.add_parser("run", help="one load run: latencies, throughput, goodput")
    _add_common_args(run)
    load = run.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="requests/s (default: all at once)")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: in flight")
    run.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson")
    run.add_argument(
        "--phases",
        default=None,
        help="YAML of phases (workload, duration_s, rate): bench/phases.py",
    )
    run.set_defaults(func=cmd_run)

    goodput = commands.add_parser("goodput", help="highest rate within the SLOs (DistServe)")
    _add_common_args(goodput)
    goodput.add_argument("--attainment", type=float, default=0.9, help="fraction meeting SLOs")
    goodput.add_argument("--cores", type=int, default=None, help="default: this machine's")
    goodput.add_argument("--start-rate", type=float, default=1.0, help="first rate probed")
    goodput.add_argument("--max-probes", type=int, default=8, help="runs at most")
    goodput.add_argument(
        "--rel-tol", type=float, default=0.05, help="stop when bracket is this tight"
    )
    goodput.set_defaults(func=cmd_goodput)

    # NOTE: these mirror `report.add_compare_args` and `sweep.add_sweep_args`; importing
    # those modules here would load matplotlib for every `pdserve` command.
    compare = commands.add_parser("compare", help="side-by-side table of saved runs")
    compare.add_argument("paths", nargs="+", help="run JSON files (`pdserve bench run --out`)")
    compare.add_argument("--html", default=None, help="also write a comparison HTML report")
    compare.set_defaults(func=lambda args: _delegate("pdserve.bench.report", "cmd_compare", args))

    sweep = commands.add_parser("sweep", help="goodput of each server configuration in a YAML")
    sweep.add_argument("config", help="sweep YAML: server configurations and workloads")
    sweep.add_argument("--out", default=None, help="folder for results and the report")
    sweep.add_argument("--dry-run", action="store_true", help="validate and print the plan")
    sweep.set_defaults(func=lambda args: _delegate("pdserve.bench.sweep", "cmd_sweep", args))


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("server")
    target.add_argument("--url", default=DEFAULT_URL, help=f"base URL (default {DEFAULT_URL})")
    target.add_argument("--model", default=None, help="default: first id of GET /v1/models")
    target.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY)")
    target.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default=None,
        help="default: chat if the workload sends messages, else completions",
    )
    target.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos (pdserve, vLLM): outputs run to max_tokens",
    )
    target.add_argument("--extra-body", default=None, help="JSON object merged into each body")
    target.add_argument("--request-timeout", type=float, default=600.0, help="seconds of silence")

    load = parser.add_argument_group("load")
    source = load.add_mutually_exclusive_group()
    source.add_argument("--workload", default="random", help="workload name (default random)")
    source.add_argument("--trace", default=None, help="Mooncake-format JSONL trace to replay")
    stop = load.add_mutually_exclusive_group()
    stop.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help=f"requests per run (default {DEFAULT_NUM_REQUESTS}; a trace: all)",
    )
    stop.add_argument("--duration", type=float, default=None, help="seconds of sending per run")
    load.add_argument("--seed", type=int, default=0, help="workload sampling and arrivals")
    load.add_argument("--time-scale", type=float, default=1.0, help="trace: 0.5 is twice as fast")
    load.add_argument(
        "--tokenizer", default=None, help="model folder: exact prompt lengths (default: estimate)"
    )

    report = parser.add_argument_group("SLOs and report")
    report.add_argument("--slo-ttft", type=float, default=None, help="ms (default: workload's)")
    report.add_argument("--slo-tpot", type=float, default=None, help="ms (default: workload's)")
    report.add_argument("--price-per-hour", type=float, default=None, help="machine $/hour")
    report.add_argument("--label", default=None, help="name of this run in comparisons")
    report.add_argument("--out", default=None, help="write the result as JSON here")
    report.add_argument("--html", default=None, help="write a self-contained HTML report here")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- commands -------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from pdserve.bench import loadgen, metrics

    if args.phases:
        return cmd_run_phases(args)
    arrival = _arrival(args)
    num_requests = _num_requests(args)
    specs, default_slo = load_specs(args, _num_specs(args, num_requests))
    slo = _slo(args, default_slo)
    model = args.model or loadgen.fetch_model_id(args.url, _api_key(args))
    result = loadgen.run_benchmark_sync(
        args.url,
        model,
        specs,
        arrival,
        num_requests=num_requests,
        duration_s=args.duration,
        config=_config(args, slo),
        **_request_options(args, specs),
    )
    summary = metrics.summarize(result, slo, args.price_per_hour)
    print(metrics.format_summary(summary, result.config))
    if args.out:
        _write(args.out, metrics.to_json(result, summary))
    if args.html:
        from pdserve.bench.report import write_html

        label = args.label or result.config.get("workload") or "run"
        write_html(args.html, [(label, result, summary)])
        print(f"report: {args.html}")
    return 0


def cmd_run_phases(args: argparse.Namespace) -> int:
    """`run --phases FILE`: the phases' traffic, one after another; a table per phase."""
    from pdserve.bench import loadgen, metrics, phases

    given = [f"--{k.replace('_', '-')}" for k in PHASES_EXCLUDE if getattr(args, k) is not None]
    if given:
        raise ConfigError("phases", f"the phases file sets the load; drop {', '.join(given)}")
    tokenizer = _tokenizer(args)
    steps, seed = phases.load_phases(args.phases)
    seed = args.seed if seed is None else seed
    load = phases.build_load(steps, seed, tokenizer)
    model = args.model or loadgen.fetch_model_id(args.url, _api_key(args))
    config = {**_config(args, None), "workload": None, "phases": phases.phases_config(load)}
    result = loadgen.run_benchmark_sync(
        args.url,
        model,
        load.specs,
        loadgen.Arrival.trace(),
        config=config,
        **{**_request_options(args, load.specs), "seed": seed},
    )
    parts = phases.summarize_phases(result)
    print(metrics.format_summary(parts[-1].summary, result.config))
    print("\n" + phases.format_phases(parts))
    if args.out:
        data = json.loads(metrics.to_json(result, parts[-1].summary))
        _write(args.out, json.dumps({**data, "phases": phases.phases_to_dict(parts)}, indent=1))
    return 0


PHASES_EXCLUDE = (
    "trace",
    "rate",
    "concurrency",
    "num_requests",
    "duration",
    "slo_ttft",
    "slo_tpot",
)


def cmd_goodput(args: argparse.Namespace) -> int:
    from pdserve.bench import goodput, loadgen

    num_requests = _num_requests(args)
    num_specs = _num_specs(args, num_requests)
    if num_requests is not None:  # distinct requests for every probe (see find_goodput)
        num_specs = goodput.specs_for_search(num_requests, 0.0, args.start_rate, args.max_probes)
    specs, default_slo = load_specs(args, num_specs)
    slo = _slo(args, default_slo)
    if slo is None:
        raise ConfigError(
            "slo", "goodput needs --slo-ttft and --slo-tpot (a trace has no defaults)"
        )
    model = args.model or loadgen.fetch_model_id(args.url, _api_key(args))

    def show(probe: goodput.Probe, is_passing: bool) -> None:
        verdict = "pass" if is_passing else "fail"
        attained = 100 * (probe.summary.slo_attainment or 0.0)
        print(f"rate {probe.rate:.3f} req/s: attainment {attained:.1f}% -> {verdict}", flush=True)

    result = goodput.find_goodput(
        args.url,
        model,
        specs,
        slo,
        num_requests=num_requests,
        duration_s=args.duration,
        config=_config(args, slo),
        attainment=args.attainment,
        start_rate=args.start_rate,
        max_probes=args.max_probes,
        rel_tol=args.rel_tol,
        num_cores=args.cores,
        price_per_hour=args.price_per_hour,
        on_probe=show,
        **_request_options(args, specs),
    )
    print(goodput.format_goodput(result))
    if args.out:
        data = {**goodput.goodput_to_dict(result), "config": _config(args, slo)}
        _write(args.out, json.dumps(data, indent=1, allow_nan=False))
    if args.html:
        from pdserve.bench.report import write_goodput_html

        write_goodput_html(args.html, {args.label or "goodput": result})
        print(f"report: {args.html}")
    return 0


def _delegate(module_name: str, function_name: str, args: argparse.Namespace) -> int:
    import importlib

    return getattr(importlib.import_module(module_name), function_name)(args)


# ---- helpers --------------------------------------------------------------------------


def load_specs(args: argparse.Namespace, num_specs: int) -> tuple[list[RequestSpec], SLO | None]:
    """The requests to send and the workload's default SLO (None for a trace)."""
    tokenizer = _tokenizer(args)
    if args.trace:
        from pdserve.bench.trace import load_trace

        specs = load_trace(
            args.trace,
            tokenizer=tokenizer,
            max_requests=args.num_requests,
            time_scale=args.time_scale,
            seed=args.seed,
        )
        return specs, None
    from pdserve.bench.workloads import get_workload

    workload = get_workload(args.workload)
    return list(workload.sample(num_specs, args.seed, tokenizer)), workload.default_slo


def _tokenizer(args: argparse.Namespace):
    if not args.tokenizer:
        return None
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(args.tokenizer)


def _arrival(args: argparse.Namespace):
    from pdserve.bench.loadgen import Arrival

    if args.concurrency is not None:
        return Arrival.closed(args.concurrency)
    if args.rate is None:
        return Arrival.trace() if args.trace else Arrival.poisson(math.inf)
    if args.burstiness != 1.0:
        return Arrival.gamma(args.rate, args.burstiness)
    return Arrival.poisson(args.rate)


def _num_requests(args: argparse.Namespace) -> int | None:
    if args.num_requests is not None or args.duration is not None or args.trace:
        return args.num_requests
    return DEFAULT_NUM_REQUESTS


def _num_specs(args: argparse.Namespace, num_requests: int | None) -> int:
    if num_requests is not None:
        return num_requests
    rate = getattr(args, "rate", None)
    if rate is not None and args.duration is not None:
        return min(SPECS_FOR_DURATION, math.ceil(rate * args.duration * 1.5) + 10)
    return SPECS_FOR_DURATION


def _slo(args: argparse.Namespace, default: SLO | None) -> SLO | None:
    if args.slo_ttft is None and args.slo_tpot is None:
        return default
    ttft = args.slo_ttft if args.slo_ttft is not None else (default and default.ttft_ms)
    tpot = args.slo_tpot if args.slo_tpot is not None else (default and default.tpot_ms)
    if ttft is None or tpot is None:
        raise ConfigError("slo", "give both --slo-ttft and --slo-tpot (a trace has no defaults)")
    return SLO(ttft_ms=ttft, tpot_ms=tpot)


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("OPENAI_API_KEY")


def _request_options(args: argparse.Namespace, specs: list[RequestSpec]) -> dict[str, Any]:
    extra_body = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra_body, dict):
        raise ConfigError("extra_body", "must be a JSON object")
    if args.ignore_eos:
        extra_body["ignore_eos"] = True
    endpoint = args.endpoint
    if endpoint is None:
        endpoint = "chat" if all(s.prompt is None for s in specs) else "completions"
    return {
        "endpoint": endpoint,
        "extra_body": extra_body,
        "api_key": _api_key(args),
        "seed": args.seed,
        "request_timeout_s": args.request_timeout,
        "progress": not args.no_progress,
    }


def _config(args: argparse.Namespace, slo: SLO | None) -> dict[str, Any]:
    """What `RunResult.config` records beyond the load generator's own settings; the
    report reads the SLO, price and label back from these keys."""
    return {
        "workload": None if args.trace else args.workload,
        "trace": args.trace,
        "slo_ttft_ms": slo.ttft_ms if slo else None,
        "slo_tpot_ms": slo.tpot_ms if slo else None,
        "price_per_hour": args.price_per_hour,
        "label": args.label,
        "client_cpu_count": os.cpu_count(),
    }


def _write(path: str, text: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
