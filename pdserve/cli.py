"""The `pdserve` command line.

    pdserve generate --prompt "Once upon a time" [--model DIR] [--max-tokens N] [...]
    pdserve chat [--model DIR]             interactive chat on the model's chat template
    pdserve model create [--out DIR]       write the built-in model (default: the cache folder)
    pdserve model path                     print where the built-in model lives
    pdserve serve [--config serve.yaml] [flags]   router + workers: the OpenAI HTTP server
    pdserve router [flags]                 the router alone (workers join from elsewhere)
    pdserve worker --role prefill|decode|mixed --router ADDR   one worker process
    pdserve worker --spec FILE             the same, from a WorkerSpec file (what serve uses)
    pdserve bench ...                      load tests and reports (pdserve/bench/cli.py)
    pdserve profile | sim | plan ...       cost profile, simulator, planner (pdserve/sim/cli.py)

Heavy imports (torch, the engine) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pdserve.errors import PdserveError


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="HF model folder (default: built-in model)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument("--max-num-batched-tokens", type=int, default=None)
    group.add_argument("--kv-cache-memory-gib", type=float, default=2.0)
    group.add_argument("--num-kv-blocks", type=int, default=None)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--no-chunked-prefill", action="store_true")
    group.add_argument("--no-prefix-caching", action="store_true")
    group.add_argument(
        "--batch-invariant",
        action="store_true",
        help="logits of a row bitwise independent of its batch (CPU float32)",
    )
    group.add_argument(
        "--quantization",
        default=None,
        choices=["int8"],
        help="8-bit weights (lossy; default: the checkpoint's precision, --dtype)",
    )
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    group.add_argument("--seed", type=int, default=0)
    tiers = parser.add_argument_group("KV cache tiers (below the device pool; all off by default)")
    tiers.add_argument("--kv-host-cache-gib", type=float, default=0.0, help="host RAM tier")
    tiers.add_argument("--kv-disk-cache-dir", default=None, help="disk tier folder")
    tiers.add_argument("--kv-disk-cache-gib", type=float, default=16.0, help="disk tier cap")
    tiers.add_argument("--kv-redis-url", default=None, help="Redis tier, redis://host:port/db")
    tiers.add_argument("--kv-tier-dtype", default="auto", choices=["auto", "int8"])
    tiers.add_argument(
        "--kv-tier-admission",
        default="all",
        choices=["all", "frequency"],
        help="which blocks enter disk/Redis: all, or prefixes seen often (frequency)",
    )
    tiers.add_argument("--kv-tier-admission-threshold", type=int, default=2)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=64)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=not args.no_chunked_prefill,
        enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.threads,
        kv_host_cache_gib=args.kv_host_cache_gib,
        kv_disk_cache_dir=args.kv_disk_cache_dir,
        kv_disk_cache_gib=args.kv_disk_cache_gib,
        kv_redis_url=args.kv_redis_url,
        kv_tier_dtype=args.kv_tier_dtype,
        kv_tier_admission=args.kv_tier_admission,
        kv_tier_admission_threshold=args.kv_tier_admission_threshold,
        batch_invariant=args.batch_invariant,
        quantization=args.quantization,
    )


def _make_llm(args: argparse.Namespace):
    from pdserve.llm import LLM

    return LLM(args.model, **_engine_kwargs(args))


def _sampling_params(args: argparse.Namespace):
    from pdserve.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling_params(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    elapsed = time.perf_counter() - start
    num_tokens = 0
    for output in outputs:
        completion = output.outputs[0]
        num_tokens += len(completion.token_ids)
        print(f"{output.prompt}{completion.text}")
        print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]")
    print(f"[{num_tokens} tokens in {elapsed:.2f} s]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling_params(args)
    messages: list[dict[str, str]] = []
    print("pdserve chat — type a message, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        completion = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
        print(f"model> {completion.text}")
        messages.append({"role": "assistant", "content": completion.text})


def cmd_model_create(args: argparse.Namespace) -> int:
    from pdserve.model.builtin import create_builtin_model, ensure_builtin_model

    path = ensure_builtin_model() if args.out is None else create_builtin_model(args.out)
    print(path)
    return 0


def cmd_model_path(args: argparse.Namespace) -> int:
    from pdserve.model.builtin import builtin_model_dir

    print(builtin_model_dir())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from pdserve.worker.worker import run_worker

    run_worker(worker_config(args))
    return 0


def worker_config(args: argparse.Namespace):
    """The `WorkerConfig` of `pdserve worker`: from `--spec FILE`, or else from the flags."""
    from pathlib import Path

    from pdserve.config import EngineConfig
    from pdserve.model.builtin import ensure_builtin_model
    from pdserve.worker.build import WorkerConfig

    if args.spec:  # a supervisor's probe file goes with how it runs the process, not the spec
        health_file = Path(args.health_file) if args.health_file else None
        return _spec_worker_config(args.spec, health_file)
    if not (args.role and args.router):
        raise SystemExit("error: pdserve worker needs --spec FILE, or --role and --router")
    model_dir = Path(args.model) if args.model else ensure_builtin_model(progress=False)
    config = WorkerConfig(
        worker_id=args.worker_id or f"{args.role}-{os.getpid()}",
        role=args.role,
        model_dir=model_dir,
        router_addr=args.router,
        engine=EngineConfig(**_engine_kwargs(args)),
        host=args.host,
        advertise_host=args.advertise_host,
        backends=tuple(b for b in args.kv_backends.split(",") if b),
        kv_layerwise=not args.no_kv_layerwise,
        cluster_key_file=_worker_key_file(args),
        kv_transport_security=args.kv_transport_security,
        health_file=Path(args.health_file) if args.health_file else None,
    )
    return config


def _spec_worker_config(path: str, health_file=None):
    from pathlib import Path

    from pdserve.control.worker_spec import read_spec
    from pdserve.worker.build import WorkerConfig

    spec = read_spec(path)
    return WorkerConfig(
        worker_id=spec.worker_id,
        role=spec.role,
        model_dir=Path(spec.model_dir),
        router_addr=spec.router_addr,
        engine=spec.engine,
        host=spec.host,
        advertise_host=spec.advertise_host,
        backends=spec.backends,
        kv_layerwise=spec.kv_layerwise,
        cluster_key_file=Path(spec.cluster_key_file) if spec.cluster_key_file else None,
        kv_transport_security=spec.kv_transport_security,
        health_file=health_file,
    )


def _worker_key_file(args: argparse.Namespace):
    from pathlib import Path

    if args.insecure_no_curve:
        return None  # the worker logs the warning
    if not args.cluster_key:
        raise SystemExit(
            "error: pdserve worker needs --cluster-key FILE (the router's key, see "
            "`pdserve keys`), or --insecure-no-curve for debugging"
        )
    return Path(args.cluster_key)


def cmd_keys(args: argparse.Namespace) -> int:
    """Write a new cluster key for `pdserve router` / `pdserve worker --cluster-key`."""
    from pathlib import Path

    from pdserve.ipc import security

    folder = Path(args.out)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / security.KEY_FILE_NAME
    try:
        key = security.write_key_file(security.generate_key(), path)
    except FileExistsError:
        raise SystemExit(f"error: {path} exists; remove it first to replace the key") from None
    print(f"wrote {key} (mode 0600); copy it to every host of the cluster")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pdserve.serve_config import ServeConfig

    return _run_serve(ServeConfig.from_args(args))


def _run_serve(config) -> int:
    """The router here, or in a Ray actor that this process supervises (`router_on_ray`)."""
    if config.router_on_ray:
        from pdserve.serve_ray import run_serve_on_ray

        return run_serve_on_ray(config)
    from pdserve.serve import run_serve

    return run_serve(config)


def cmd_router(args: argparse.Namespace) -> int:
    """The router alone; workers are started separately and register with it."""
    from dataclasses import replace

    from pdserve.serve_config import ServeConfig

    config = ServeConfig.from_args(args)
    given = {n: getattr(args, f"{n}_workers") for n in ("prefill", "decode", "mixed")}
    config = replace(
        config,
        prefill_workers=given["prefill"] or 0,
        decode_workers=given["decode"] or 0,
        mixed_workers=given["mixed"] or 0,
        external_workers=args.expect_workers,
        router_port=config.router_port or DEFAULT_ROUTER_PORT,
    )
    return _run_serve(config)


DEFAULT_ROUTER_PORT = 5557


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate from prompts (args or stdin)")
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    _add_engine_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat with the model")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = commands.add_parser("serve", help="start the OpenAI-compatible server")
    from pdserve.serve_flags import add_serve_args

    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    router = commands.add_parser("router", help="start only the router; workers join it")
    add_serve_args(router)
    router.add_argument("--expect-workers", type=int, default=1, help="workers /ready waits for")
    router.set_defaults(func=cmd_router)

    worker = commands.add_parser("worker", help="run one worker (usually started by serve)")
    worker.add_argument(
        "--spec", default=None, help="a WorkerSpec JSON file (serve writes one); no other flags"
    )
    worker.add_argument("--role", default=None, choices=["prefill", "decode", "mixed"])
    worker.add_argument("--router", default=None, help="router address, tcp://host:port")
    worker.add_argument("--worker-id", default=None)
    worker.add_argument("--host", default="127.0.0.1", help="interface the worker binds")
    worker.add_argument(
        "--advertise-host", default=None, help="address others use (with --host 0.0.0.0)"
    )
    worker.add_argument("--kv-backends", default="shm,tcp", help="comma-separated")
    worker.add_argument("--no-kv-layerwise", action="store_true", help="send KV after prefill")
    worker.add_argument("--cluster-key", default=None, help="the cluster's CURVE key file")
    worker.add_argument(
        "--insecure-no-curve", action="store_true", help="DEBUG ONLY: sockets without CURVE"
    )
    worker.add_argument(
        "--kv-transport-security",
        default="encrypt",
        choices=["encrypt", "mac"],
        help="KV between workers: CURVE-encrypted, or MAC-authenticated only (the same on "
        "every worker of a cluster)",
    )
    worker.add_argument(
        "--health-file",
        default=None,
        help="stamp this file with the engine loop's last pass, for probes (worker/liveness.py)",
    )
    _add_engine_args(worker)
    worker.set_defaults(func=cmd_worker)

    keys = commands.add_parser("keys", help="write a cluster key file for router and workers")
    keys.add_argument("--out", required=True, help="folder for cluster.key (created 0700)")
    keys.set_defaults(func=cmd_keys)

    model = commands.add_parser("model", help="manage the built-in model")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    create = model_commands.add_parser("create", help="create the built-in model")
    create.add_argument("--out", default=None, help="folder to write (default: cache folder)")
    create.set_defaults(func=cmd_model_create)
    path = model_commands.add_parser("path", help="print the built-in model's cache folder")
    path.set_defaults(func=cmd_model_path)

    from pdserve.bench.cli import add_bench_parser

    add_bench_parser(commands)
    from pdserve.sim.cli import add_sim_parsers

    add_sim_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PdserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
