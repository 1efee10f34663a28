"""Measuring a `Profile` on this machine (`pdserve profile`), and merging measured ones.

For each thread count a child process times the model runner on synthetic batches
(`python -m pdserve.engine.step_timing`, the only part that imports torch); then two
children at once time a few shapes to get the slowdown of sharing the machine (two
factors and a curve by step size); the decode side of a hand-over is timed in-process
(sim/receive.py); ZeroMQ over loopback gives the tcp backend's bandwidth and the message latency. `--quick`
(tests) uses a coarse grid, skips the contention runs and finishes in about 10 s per
thread count on two idle cores; the full grid takes a few minutes.

`merge_fastest` combines several measured profiles shape by shape (a shared host only
ever slows a run down). Torch-free.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pdserve.config import ModelConfig
from pdserve.errors import ConfigError
from pdserve.sim.cost_model import (
    StepCost,
    StepShape,
    TimedStep,
    fit_step_cost,
    relative_errors,
)
from pdserve.sim.hardware import this_machine
from pdserve.sim.profile import Profile, TransferCost, model_facts
from pdserve.sim.receive import measure_receive


def measure_profile(
    threads: list[int], quick: bool = False, model: str | None = None, log=print
) -> Profile:
    """Measure this machine: step costs per thread count, contention, transfers."""
    grid, repeats = ("quick", 3) if quick else ("full", 7)
    runs = {}
    for n in threads:
        log(f"timing steps with {n} thread(s) ({grid} grid)...")
        runs[n] = _run_child(n, grid, repeats, model)
    costs, checks = {}, {}
    for n, run in runs.items():
        costs[n], checks[str(n)] = _fit(run)
    contention = compute_contention = 1.0  # --quick: not measured (two more children)
    if not quick:
        log("timing two workers at once (contention)...")
        (contention, compute_contention), checks["contention"] = _contention(model, repeats)
    curve = fit_contention_curve([checks["contention"]]) if not quick else ()
    log("timing the decode side of a hand-over...")
    per_request, per_block, checks["receive"] = measure_receive(quick)
    log("timing ZeroMQ over loopback...")
    tcp, ipc_latency = _measure_tcp()
    first = runs[threads[0]]
    copy = _fit_copy(first["copy"])
    return Profile(
        kind="measured",
        hardware=this_machine(),
        model=model_facts(
            ModelConfig.from_pretrained(first["model_dir"]),
            Path(first["model_dir"]).name,
            first["dtype"],
        ),
        costs=costs,
        transfer={"shm": copy, "tcp": tcp, "nixl": tcp},
        ipc_latency_s=ipc_latency,
        cores=os.cpu_count() or 1,
        contention=contention,
        compute_contention=compute_contention,
        contention_curve=curve,
        receive_s_per_request=per_request,
        receive_s_per_block=per_block,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        notes=(
            f"pdserve profile{' --quick' if quick else ''}: model runner timed on synthetic "
            f"batches, fastest of {repeats}, temperature-1 sampling; nixl assumed like tcp"
            + ("; contention not measured (--quick)" if quick else ""),
        ),
        checks=checks | {"runs": runs},
    )


def merge_fastest(profiles: list[Profile]) -> Profile:
    """One profile from several measured ones: each step shape at its fastest observed
    time, refitted; the fastest transfers; the smallest contention. On a shared host every
    run is slowed by whatever else ran then, never sped up, so the fastest observation
    of each shape is the nearest estimate of the machine to itself."""
    if not profiles or any(p.kind != "measured" or "runs" not in p.checks for p in profiles):
        raise ConfigError("profile", "merge needs measured profiles with their samples")
    runs: dict[str, dict[str, Any]] = {}
    for profile in profiles:
        for size, run in profile.checks["runs"].items():
            merged = runs.setdefault(size, {**run, "samples": list(run["samples"])})
            fastest = {_shape_key(s): s for s in merged["samples"]}
            for sample in run["samples"]:
                key = _shape_key(sample)
                if key not in fastest or sample["seconds"] < fastest[key]["seconds"]:
                    fastest[key] = sample
            merged["samples"] = list(fastest.values())
    costs, checks = {}, {}
    for size, run in runs.items():
        costs[int(size)], checks[size] = _fit(run)
    transfer = {
        name: max((p.transfer[name] for p in profiles if name in p.transfer), key=_bandwidth)
        for name in profiles[0].transfer
    }
    return dataclasses.replace(
        profiles[0],
        costs=costs,
        transfer=transfer,
        ipc_latency_s=min(p.ipc_latency_s for p in profiles),
        contention=min(c for c, _ in map(_contention_of, profiles)),
        compute_contention=min(k for _, k in map(_contention_of, profiles)),
        contention_curve=fit_contention_curve([p.checks.get("contention") for p in profiles])
        or profiles[0].contention_curve,
        receive_s_per_request=_smallest_measured(p.receive_s_per_request for p in profiles),
        receive_s_per_block=_smallest_measured(p.receive_s_per_block for p in profiles),
        notes=(f"the fastest of {len(profiles)} measured profiles, shape by shape, refitted",),
        checks=checks | {"runs": runs, "merged_from": [p.created for p in profiles]},
    )


def _smallest_measured(values) -> float:
    """The smallest of the values a profile measured (0.0: older profiles did not)."""
    return min((v for v in values if v > 0), default=0.0)


def _contention_of(profile: Profile) -> tuple[float, float]:
    """A profile's two contention factors, refitted from its contention samples when it
    kept them (profiles from before `compute_contention` stored only one factor)."""
    details = profile.checks.get("contention") or {}
    alone, slowdowns = details.get("alone"), details.get("slowdowns")
    if not alone or not slowdowns or len(slowdowns) % len(alone):
        return profile.contention, profile.compute_contention
    memory_s = min(s["seconds"] for s in alone if s["kind"] == "decode" and s["num_decodes"] == 1)
    rows = []
    for i, slowdown in enumerate(slowdowns):
        t = alone[i % len(alone)]["seconds"]
        rows.append((min(t, memory_s), t - min(t, memory_s), (slowdown - 1.0) * t))
    return fit_contention(rows)


def fit_contention_curve(runs: list[dict[str, Any] | None]) -> tuple[tuple[int, float], ...]:
    """`Profile.contention_curve` from contention runs (`checks["contention"]` of one or
    more profiles): per step shape, its tokens (a prefill's new tokens, a decode's rows)
    and the median slowdown over every child of every run (at least 1); one knot per
    token count (shapes with equal counts pooled). Empty without samples."""
    pooled: dict[int, list[float]] = {}
    for run in runs:
        alone, slowdowns = (run or {}).get("alone"), (run or {}).get("slowdowns")
        if not alone or not slowdowns or len(slowdowns) % len(alone):
            continue
        for i, slowdown in enumerate(slowdowns):
            shape = alone[i % len(alone)]
            tokens = shape["num_decodes"] + shape["prefill_tokens"]
            pooled.setdefault(tokens, []).append(slowdown)
    return tuple(
        (tokens, max(1.0, statistics.median(values))) for tokens, values in sorted(pooled.items())
    )


def _bandwidth(transfer: TransferCost) -> float:
    return transfer.bytes_per_s


def _shape_key(sample: dict[str, Any]) -> tuple:
    keys = ("kind", "num_decodes", "decode_context", "prefill_tokens", "prefill_context")
    return tuple(sample[k] for k in keys)


def _run_child(threads: int, grid: str, repeats: int, model: str | None) -> dict[str, Any]:
    proc = _start_child(threads, grid, repeats, model)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise ConfigError("profile", f"step timing failed ({threads} threads): {err[-2000:]}")
    return json.loads(out)


def _start_child(threads: int, grid: str, repeats: int, model: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdserve.engine.step_timing", "--threads", str(threads)]
    cmd += ["--grid", grid, "--repeats", str(repeats)]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _timed_steps(samples: list[dict[str, Any]]) -> list[TimedStep]:
    steps = []
    for s in samples:
        b, c = s["num_decodes"], s["decode_context"]
        q, pc = s["prefill_tokens"], s["prefill_context"]
        shape = StepShape(
            num_tokens=b + q,
            num_sampled=b + (1 if q else 0),
            prefill_attention=q * (pc + q) if q > 1 else 0,
            decode_context=b * (c + 1) + (pc + 1 if q == 1 else 0),
        )
        steps.append(TimedStep(shape, s["seconds"]))
    return steps


def _fit(run: dict[str, Any]) -> tuple[StepCost, dict[str, Any]]:
    fitted = [s for s in run["samples"] if s["kind"] != "mixed"]
    held_out = [s for s in run["samples"] if s["kind"] == "mixed"]
    cost = fit_step_cost(_timed_steps(fitted))
    errors = relative_errors(cost, _timed_steps(fitted))
    checks = {
        "fit_max_abs_error": max(map(abs, errors)),
        "mixed_step_errors": relative_errors(cost, _timed_steps(held_out)),
    }
    return cost, checks


def _fit_copy(copies: list[dict[str, Any]]) -> TransferCost:
    largest = max(copies, key=lambda c: c["bytes"])
    return TransferCost(
        latency_s=0.0, bytes_per_s=largest["bytes"] / largest["seconds"], on_sender=True
    )


def _contention(model: str | None, repeats: int) -> tuple[tuple[float, float], dict[str, Any]]:
    """`Profile.contention` and `compute_contention`: how much slower the weights' read
    and the rest of a step get while another 1-thread worker steps beside it. Each shape
    timed alone (`t`) and together (`s * t`) splits into its weight read `m = min(t,
    memory_s)` (a one-row decode's time alone: all read) and compute `t - m`, so
    `(s - 1) t = (contention - 1) m + (compute_contention - 1) (t - m)`; both factors
    from least squares over the shapes and both children (each at least 1)."""
    if (os.cpu_count() or 1) < 2:
        return (1.0, 1.0), {}
    alone = _run_child(1, "contention", repeats, model)
    procs = [_start_child(1, "contention", repeats, model) for _ in range(2)]
    together = [json.loads(p.communicate()[0]) for p in procs]
    memory_s = min(
        s["seconds"] for s in alone["samples"] if s["kind"] == "decode" and s["num_decodes"] == 1
    )
    rows, slowdowns = [], []
    for run in together:
        for a, b in zip(alone["samples"], run["samples"], strict=True):
            t = a["seconds"]
            slowdowns.append(b["seconds"] / t)
            rows.append((min(t, memory_s), t - min(t, memory_s), b["seconds"] - t))
    factors = fit_contention(rows)
    details = {"alone": alone["samples"], "slowdowns": slowdowns, "factors": list(factors)}
    return factors, details


def fit_contention(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(contention, compute_contention) from rows (read seconds, compute seconds, extra
    seconds together): least squares on `extra = (c - 1) read + (k - 1) compute`, a
    negative excess (noise) clipped to 0 and the other refitted."""

    def one(index: int) -> float:
        den = sum(r[index] ** 2 for r in rows)
        return max(0.0, sum(r[index] * r[2] for r in rows) / den) if den else 0.0

    srr = sum(r[0] * r[0] for r in rows)
    scc = sum(r[1] * r[1] for r in rows)
    src = sum(r[0] * r[1] for r in rows)
    sre = sum(r[0] * r[2] for r in rows)
    sce = sum(r[1] * r[2] for r in rows)
    det = srr * scc - src * src
    if det <= 1e-18 * max(srr * scc, 1e-300):
        return 1.0 + one(0), 1.0
    read = (sre * scc - sce * src) / det
    compute = (srr * sce - src * sre) / det
    if read < 0:
        read, compute = 0.0, one(1)
    elif compute < 0:
        read, compute = one(0), 0.0
    return 1.0 + read, 1.0 + compute


def _measure_tcp() -> tuple[TransferCost, float]:
    """Bandwidth of large frames and the latency of a small message over loopback."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        push.send(b"x")
        pull.recv()
        small = []
        for _ in range(50):
            start = time.perf_counter()
            push.send(b"x")
            pull.recv()
            small.append(time.perf_counter() - start)
        payload = bytes(32 << 20)
        big = []
        for _ in range(3):
            start = time.perf_counter()
            push.send(payload, copy=False)
            pull.recv(copy=False)
            big.append(time.perf_counter() - start)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
    latency = statistics.median(small)
    return TransferCost(latency, len(payload) / statistics.median(big)), latency
