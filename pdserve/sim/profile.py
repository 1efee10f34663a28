"""`Profile`: what a worker's steps and hand-overs cost on some hardware, and
`pdserve profile`, which measures one on this machine.

A profile holds, per worker size (CPU threads per worker here; GPUs per worker in an
analytic profile), one fitted `StepCost` (sim/cost_model.py), plus the KV hand-over cost
per transfer backend, the latency of one internal message, and how much a step slows when
every core of the machine is busy (memory bandwidth shared by co-located workers). It
names the hardware (CPU model, ISA, cores) and the model it was taken on, and keeps its
raw samples and the fit's error on each, so a reader can judge it.

Measuring (`measure_profile`): for each thread count a child process times the model
runner on synthetic batches (`python -m pdserve.engine.step_timing`, the only part that
imports torch); then two children at once time a few shapes to get the slowdown of
sharing the machine; ZeroMQ over loopback gives the tcp backend's bandwidth and the
message latency. `--quick` (tests) uses a coarse grid, skips the contention runs and
finishes in about 10 s per thread count on two idle cores; the full grid takes a few
minutes.

Files are JSON, or YAML when the name ends in .yaml/.yml. Torch-free.
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
from dataclasses import asdict, dataclass, field
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

FORMAT = "pdserve-profile"
FORMAT_VERSION = 1
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TransferCost:
    """Seconds to move `n` bytes of KV: latency + n / bytes_per_s. `on_sender`: the copy
    runs inside the prefill worker's step (shm writes straight into the decode pool);
    otherwise it overlaps compute and only delays the decode side."""

    latency_s: float
    bytes_per_s: float
    on_sender: bool = False

    def seconds(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bytes_per_s


@dataclass(frozen=True)
class Profile:
    kind: str  # measured | analytic
    hardware: dict[str, Any]
    model: dict[str, Any]
    costs: dict[int, StepCost]  # by worker size
    transfer: dict[str, TransferCost]
    ipc_latency_s: float = 1e-4
    cores: int = 1  # shared by every worker on a machine (CPU); devices per node (GPU)
    contention: float = 1.0  # step slowdown when every core is busy
    created: str = ""
    notes: tuple[str, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> list[int]:
        return sorted(self.costs)

    def cost(self, size: int) -> StepCost:
        """The step cost of a worker of `size` threads (or devices)."""
        if size not in self.costs:
            raise ConfigError(
                "threads_per_worker",
                f"{size} is not in the profile (it has worker sizes {self.sizes}); "
                f"profile with --threads {size}",
            )
        return self.costs[size]

    def transfer_cost(self, backend: str) -> TransferCost:
        if backend in self.transfer:
            return self.transfer[backend]
        fallback = next(iter(self.transfer.values()), None)
        if fallback is None:
            raise ConfigError("kv_backend", f"the profile measures no transfer ({backend})")
        return fallback

    @property
    def kv_bytes_per_token(self) -> int:
        return int(self.model["kv_bytes_per_token"])

    # ---- files ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "created": self.created,
            "notes": list(self.notes),
            "hardware": self.hardware,
            "model": self.model,
            "cores": self.cores,
            "contention": self.contention,
            "ipc_latency_s": self.ipc_latency_s,
            "costs": {str(k): v.to_dict() for k, v in sorted(self.costs.items())},
            "transfer": {k: asdict(v) for k, v in self.transfer.items()},
            "checks": self.checks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        if data.get("format") != FORMAT:
            raise ConfigError("profile", f"not a pdserve profile (format={data.get('format')!r})")
        return cls(
            kind=data["kind"],
            hardware=dict(data["hardware"]),
            model=dict(data["model"]),
            costs={int(k): StepCost.from_dict(v) for k, v in data["costs"].items()},
            transfer={k: TransferCost(**v) for k, v in data["transfer"].items()},
            ipc_latency_s=float(data.get("ipc_latency_s", 1e-4)),
            cores=int(data.get("cores", 1)),
            contention=float(data.get("contention", 1.0)),
            created=data.get("created", ""),
            notes=tuple(data.get("notes", ())),
            checks=dict(data.get("checks") or {}),
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=1)
        path.write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("profile", f"{path} does not exist") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError("profile", f"{path} does not hold a profile")
        return cls.from_dict(data)


def model_facts(config: ModelConfig, name: str, dtype: str) -> dict:
    """The numbers a profile records about a model (the same keys as a measured one)."""
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return {
        "name": name,
        "model_type": c.model_type,
        "num_params": c.num_layers * (attention + mlp) + embeddings,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_layers": c.num_layers,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "dtype": dtype,
        "kv_bytes_per_token": 2 * c.num_layers * c.num_kv_heads * c.head_dim * ITEMSIZE[dtype],
    }


# ---- measuring ------------------------------------------------------------------------------


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
    contention = 1.0  # --quick: not measured (two more children, ~10 s)
    if not quick:
        log("timing two workers at once (contention)...")
        contention = _contention(model, repeats)
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
        contention=min(p.contention for p in profiles),
        notes=(f"the fastest of {len(profiles)} measured profiles, shape by shape, refitted",),
        checks=checks | {"runs": runs, "merged_from": [p.created for p in profiles]},
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


def _contention(model: str | None, repeats: int) -> float:
    """Slowdown of a 1-thread worker's steps while another runs beside it (≥ 1)."""
    if (os.cpu_count() or 1) < 2:
        return 1.0
    alone = _run_child(1, "contention", repeats, model)
    procs = [_start_child(1, "contention", repeats, model) for _ in range(2)]
    together = [json.loads(p.communicate()[0]) for p in procs]
    ratios = []
    for run in together:
        for a, b in zip(alone["samples"], run["samples"], strict=True):
            ratios.append(b["seconds"] / a["seconds"])
    return max(1.0, statistics.median(ratios))


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


def format_profile(profile: Profile) -> str:
    """A short human summary: hardware, and the step times the fit predicts."""
    hw = profile.hardware
    lines = [
        f"{profile.kind} profile of {profile.model.get('name')} on "
        f"{hw.get('cpu_model') or hw.get('name')} ({', '.join(hw.get('isa', [])) or '-'}), "
        f"{profile.cores} cores; contention x{profile.contention:.2f}",
    ]
    for size, cost in sorted(profile.costs.items()):
        pf = [cost.seconds(StepShape(q, 1, q * q, 0)) * 1e3 for q in (128, 512, 2048)]
        dc = [cost.seconds(StepShape(b, b, 0, b * 512)) * 1e3 for b in (1, 8, 32)]
        lines.append(
            f"  size {size}: prefill 128/512/2048 tokens {pf[0]:.1f}/{pf[1]:.1f}/{pf[2]:.1f} ms; "
            f"decode batch 1/8/32 at 512 context {dc[0]:.1f}/{dc[1]:.1f}/{dc[2]:.1f} ms"
        )
    for name, t in profile.transfer.items():
        lines.append(f"  kv {name}: {t.bytes_per_s / 1e9:.2f} GB/s, {t.latency_s * 1e6:.0f} us")
    return "\n".join(lines)
