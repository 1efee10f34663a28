"""`pdserve serve` / `pdserve router` flags: the tables that mirror `ServeConfig` and
`EngineConfig` fields (`SERVE_FLAGS`, `ENGINE_FLAGS`, `SECURITY_FLAGS`) and `add_serve_args`,
which puts them on a parser. Every flag defaults to None ("not given"), so a YAML file's value
wins unless the flag is given; `ServeConfig.from_args` (serve_config.py) combines the two.
`pdserve sim` reads the same tables for its layout flags.
"""

from __future__ import annotations

import argparse

# Flags mirror ServeConfig / EngineConfig fields; None means "not given" so YAML wins.
SERVE_FLAGS = {
    "model": (str, "HF model folder (default: the built-in model)"),
    "model_name": (str, "model name clients send (default: the folder name)"),
    "host": (str, "HTTP interface (default 127.0.0.1; router on Ray: node-ip = its node's IP)"),
    "port": (int, "HTTP port (default 8000)"),
    "api_key": (str, "require this bearer key on /v1 (or set PDSERVE_API_KEY)"),
    "admin_key": (str, "bearer key for /admin/* (or set PDSERVE_ADMIN_KEY; default: off)"),
    "mode": (str, "aggregated | disaggregated | auto (default auto)"),
    "prefill_workers": (int, "prefill workers (default 1)"),
    "decode_workers": (int, "decode workers (default 1)"),
    "mixed_workers": (int, "mixed workers (default 0; 1 in aggregated mode)"),
    "threads_per_worker": (int, "CPU threads per worker (default: cores / workers)"),
    "worker_host": (str, "interface for internal sockets (default 127.0.0.1)"),
    "router_port": (int, "port workers report to (default: any free port)"),
    "kv_backend": (str, "auto | shm | tcp | nixl (default auto; nixl needs pip install nixl)"),
    "kv_wire_dtype": (str, "auto | int8: int8 KV with per-block scales on tcp (default auto)"),
    "kv_transport_security": (
        str,
        "encrypt | mac: KV between workers CURVE-encrypted, or authenticated only (a MAC "
        "per message: for private networks; default encrypt)",
    ),
    "auto_local_prefill_tokens": (int, "auto mode: prompts shorter than this prefill locally"),
    "kv_transfer_timeout_s": (float, "seconds before a KV hand-over is abandoned"),
    "routing_policy": (str, "kv_aware | least_loaded | round_robin (default kv_aware)"),
    "worker_lease_s": (float, "a worker silent or stalled this long is dead (default 5)"),
    "launcher": (str, "local | ray: worker processes here, or Ray actors (default local)"),
    "ray_address": (str, "launcher ray: the Ray cluster, HOST:PORT (default: RAY_ADDRESS)"),
    "router_max_restarts": (int, "router on Ray: times Ray restarts a dead router actor (3)"),
    "max_migrations": (int, "times a request may move to another worker (default 3)"),
    "migration_wait_s": (float, "wait this long for a worker to move a request to (30)"),
    "planner": (str, "none | slo: move workers between roles to follow the load"),
    "slo_ttft_ms": (float, "planner slo: time-to-first-token target"),
    "slo_tpot_ms": (float, "planner slo: time-per-output-token target"),
    "planner_profile": (str, "planner slo: cost model from `pdserve profile --out FILE`"),
    "planner_rates_cache": (str, "planner slo: JSON file keeping simulated rates across runs"),
    "planner_interval_s": (float, "planner slo: seconds between decisions (default 10)"),
    "planner_cooldown_s": (float, "planner slo: at least this long between switches (60)"),
    "role_switch_drain_s": (
        float,
        "a role switch lets running requests finish this long, then migrates the rest (10)",
    ),
    "kv_aware_prefill_weight": (float, "kv_aware: cost per uncached prompt token (default 1)"),
    "kv_aware_queue_weight": (float, "kv_aware: cost per queued prompt token (default 1)"),
    "kv_aware_running_weight": (float, "kv_aware: cost per assigned request (default 16)"),
    "kv_aware_usage_weight": (float, "kv_aware: cost of a full KV pool (default 512)"),
    "kv_aware_load_margin": (
        float,
        "kv_aware: tokens of load past the least-loaded worker beyond which a prefix hit "
        "no longer counts (default 4096)",
    ),
    "api_keys": (str, "YAML file of API keys with quotas (keys: [{name, key, ...}])"),
    "max_body_bytes": (int, "request bodies above this get 413 (default 4 MiB)"),
    "max_n": (int, "most samples per prompt (default 128)"),
    "max_prompts": (int, "most prompts in one completions request (default 64)"),
    "max_stop": (int, "most stop strings (default 16)"),
    "max_stop_chars": (int, "longest stop string (default 256)"),
    "max_stop_token_ids": (int, "most stop token ids (default 64)"),
    "max_prompt_bytes": (
        int,
        "prompt text bytes refused untokenised (default: context x longest token)",
    ),
    "admission_ttft_ms": (float, "429 at once when a request's predicted TTFT exceeds this"),
    "admission_prefill_tokens_per_s": (float, "admission's prefill rate until measured (2000)"),
    "max_queued_requests": (int, "429 past this many requests waiting for a first token"),
    "request_timeout_s": (float, "abort requests running longer (default: none)"),
    "limit_concurrency": (int, "most generation requests in flight; 503 past it"),
    "backlog": (int, "pending TCP connections (default 4096; capped by somaxconn)"),
}
SECURITY_FLAGS = ("cluster_key_file", "insecure_no_curve")
ENGINE_FLAGS = {
    "dtype": str,
    "device": str,
    "max_model_len": int,
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "kv_cache_memory_gib": float,
    "num_kv_blocks": int,
    "block_size": int,
    "seed": int,
    "kv_host_cache_gib": float,
    "kv_disk_cache_dir": str,
    "kv_disk_cache_gib": float,
    "kv_redis_url": str,
    "kv_tier_dtype": str,
    "quantization": str,
    "kv_tier_admission": str,
    "kv_tier_admission_threshold": int,
}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of settings")
    # Its own dest: a subcommand's default would otherwise mask `pdserve --log-level`.
    parser.add_argument(
        "--log-level",
        dest="serve_log_level",
        default=None,
        help="DEBUG | INFO | WARNING (default INFO)",
    )
    for name, (kind, help_text) in SERVE_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    parser.add_argument(
        "--protect-probes",
        dest="protect_probes",
        action="store_const",
        const=True,
        default=None,
        help="require an API key on /metrics, /ready and /docs too",
    )
    parser.add_argument(
        "--cluster-key",
        dest="cluster_key_file",
        default=None,
        help="CURVE key file from `pdserve keys` (default: a fresh key for this run)",
    )
    parser.add_argument(
        "--insecure-no-curve",
        dest="insecure_no_curve",
        action="store_const",
        const=True,
        default=None,
        help="DEBUG ONLY: internal ZeroMQ sockets without CURVE authentication/encryption",
    )
    parser.add_argument(
        "--router-on-ray",
        dest="router_on_ray",
        action="store_const",
        const=True,
        default=None,
        help="launcher ray: run the router in a Ray actor; this process supervises it",
    )
    parser.add_argument(
        "--no-kv-layerwise",
        dest="kv_layerwise",
        action="store_const",
        const=False,
        default=None,
        help="send KV after the whole prefill",
    )
    group = parser.add_argument_group("engine (per worker)")
    for name, kind in ENGINE_FLAGS.items():
        group.add_argument(
            "--" + name.replace("_", "-"), dest=f"engine_{name}", type=kind, default=None
        )
    group.add_argument(
        "--batch-invariant",
        dest="engine_batch_invariant",
        action="store_const",
        const=True,
        default=None,
        help="logits of a row bitwise independent of its batch (CPU float32)",
    )
