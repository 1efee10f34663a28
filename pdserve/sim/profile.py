"""`Profile`: what a worker's steps and hand-overs cost on some hardware.

A profile holds, per worker size (CPU threads per worker here; GPUs per worker in an
analytic profile), one fitted `StepCost` (sim/cost_model.py), plus the KV hand-over cost
per transfer backend, the latency of one internal message, how much slower a step's weight
reads and the rest of it get beside another worker (memory bandwidth, and cores that are
not quite separate, shared by co-located workers), and the
CPU the front end (router + client) spends per request and per token (sim/sharing.py). It
names the hardware (CPU model, ISA, cores) and the model it was taken on, and keeps its
raw samples and the fit's error on each, so a reader can judge it. `pdserve profile`
measures one (sim/measure.py) or derives one from a datasheet (sim/analytic.py).

Files are JSON, or YAML when the name ends in .yaml/.yml. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.config import ModelConfig
from pdserve.errors import ConfigError
from pdserve.sim.cost_model import StepCost, StepShape

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
    contention: float = 1.0  # weight reads this much slower beside another worker
    compute_contention: float = 1.0  # ... and the rest of a step (sim/sharing.py)
    frontend_s_per_request: float = 0.0  # CPU of the router + client per request
    frontend_s_per_token: float = 0.0  # ... and per streamed token (sim/sharing.py)
    frontend_s_per_step: float = 0.0  # ... and per step message a worker sends the router
    # (step tokens, slowdown beside another worker) knots; set, it replaces the two
    # factors above (sim/sharing.py `curve_slowdown`)
    contention_curve: tuple[tuple[int, float], ...] = ()
    receive_s_per_request: float = 0.0  # decode worker's CPU per hand-over (sim/receive.py)
    receive_s_per_block: float = 0.0  # ... and per block of its prompt
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
            "compute_contention": self.compute_contention,
            "frontend_s_per_request": self.frontend_s_per_request,
            "frontend_s_per_token": self.frontend_s_per_token,
            "frontend_s_per_step": self.frontend_s_per_step,
            "contention_curve": [list(k) for k in self.contention_curve],
            "receive_s_per_request": self.receive_s_per_request,
            "receive_s_per_block": self.receive_s_per_block,
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
            compute_contention=float(data.get("compute_contention", 1.0)),
            frontend_s_per_request=float(data.get("frontend_s_per_request", 0.0)),
            frontend_s_per_token=float(data.get("frontend_s_per_token", 0.0)),
            frontend_s_per_step=float(data.get("frontend_s_per_step", 0.0)),
            contention_curve=tuple(
                (int(n), float(f)) for n, f in data.get("contention_curve") or ()
            ),
            receive_s_per_request=float(data.get("receive_s_per_request", 0.0)),
            receive_s_per_block=float(data.get("receive_s_per_block", 0.0)),
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


def format_profile(profile: Profile) -> str:
    """A short human summary: hardware, and the step times the fit predicts."""
    hw = profile.hardware
    lines = [
        f"{profile.kind} profile of {profile.model.get('name')} on "
        f"{hw.get('cpu_model') or hw.get('name')} ({', '.join(hw.get('isa', [])) or '-'}), "
        f"{profile.cores} cores; contention x{profile.contention:.2f} (weights' read), "
        f"x{profile.compute_contention:.2f} (compute)",
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
