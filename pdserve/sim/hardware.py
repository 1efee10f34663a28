"""Hardware descriptions: this machine as `pdserve profile` finds it, and accelerators a
user may plan for without having one.

`this_machine()` reads the CPU model, ISA flags that matter to the kernels, cores and
memory from /proc (Linux), so every profile says where it was taken.

`ACCELERATORS` are published datasheet figures, per device, dense (no structured
sparsity), for bfloat16 tensor-core math:

| device | BF16 dense TFLOPS | memory | bandwidth | device link | source |
|---|---|---|---|---|---|
| A100 SXM4 80 GB | 312 | 80 GB HBM2e | 2,039 GB/s | NVLink 600 GB/s | NVIDIA A100 Tensor Core GPU datasheet |
| H100 SXM5 80 GB | 989 | 80 GB HBM3 | 3,350 GB/s | NVLink 900 GB/s | NVIDIA H100 Tensor Core GPU datasheet |
| H200 SXM 141 GB | 989 | 141 GB HBM3e | 4,800 GB/s | NVLink 900 GB/s | NVIDIA H200 Tensor Core GPU datasheet |
| L40S 48 GB | 362 | 48 GB GDDR6 | 864 GB/s | PCIe Gen4 x16, 64 GB/s | NVIDIA L40S datasheet |

(Datasheets quote the sparse figure first — 624, 1,979, 1,979 and 733 TFLOPS — which a
dense transformer does not reach; the dense half is used here.) The efficiency factors
(`compute_efficiency`, `bandwidth_efficiency`) and the per-step host overhead are
ESTIMATES, not measurements: a profile built from these descriptions
(`sim/analytic.py`) is labelled `analytic` and should be replaced by a real
`pdserve profile` on that hardware before a purchase depends on it. Node-to-node links
(`network_bytes_per_s`, for KV hand-over between nodes) default to 400 Gb/s
(InfiniBand NDR / 400 GbE per GPU), also an assumption to override.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.errors import ConfigError

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16, per device
    memory_bytes: float
    memory_bytes_per_s: float
    device_link_bytes_per_s: float  # within a node (NVLink / PCIe), per device
    network_bytes_per_s: float = 50e9  # between nodes, per device (400 Gb/s)
    compute_efficiency: float = 0.5  # ESTIMATE: fraction of peak FLOPs a prefill reaches
    bandwidth_efficiency: float = 0.7  # ESTIMATE: fraction of bandwidth a decode reaches
    step_overhead_s: float = 0.003  # ESTIMATE: host-side scheduling per step
    devices_per_node: int = 8
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Accelerator:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"hardware.{unknown[0]}", f"unknown; known: {sorted(known)}")
        return cls(**data)


GB = 1e9
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            "A100-SXM4-80GB",
            312e12,
            80 * GB,
            2039 * GB,
            600 * GB,
            source="NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense, "
            "HBM2e 2,039 GB/s, NVLink 600 GB/s",
        ),
        Accelerator(
            "H100-SXM5-80GB",
            989e12,
            80 * GB,
            3350 * GB,
            900 * GB,
            source="NVIDIA H100 Tensor Core GPU datasheet: BF16 989 TFLOPS dense "
            "(1,979 with sparsity), HBM3 3.35 TB/s, NVLink 900 GB/s",
        ),
        Accelerator(
            "H200-SXM-141GB",
            989e12,
            141 * GB,
            4800 * GB,
            900 * GB,
            source="NVIDIA H200 Tensor Core GPU datasheet: BF16 989 TFLOPS dense "
            "(1,979 with sparsity), HBM3e 4.8 TB/s, NVLink 900 GB/s",
        ),
        Accelerator(
            "L40S-48GB",
            362e12,
            48 * GB,
            864 * GB,
            64 * GB,
            source="NVIDIA L40S datasheet: BF16 362 TFLOPS dense (733 with sparsity), "
            "GDDR6 864 GB/s, PCIe Gen4 x16 64 GB/s",
        ),
    )
}


def get_accelerator(name: str, **overrides: Any) -> Accelerator:
    """A shipped description by name (case-insensitive prefix, e.g. `h100`), or a YAML
    file holding `Accelerator` fields."""
    if name.endswith((".yaml", ".yml", ".json")):
        return Accelerator.from_dict({**_read_mapping(Path(name)), **overrides})
    matches = [a for key, a in ACCELERATORS.items() if key.lower().startswith(name.lower())]
    if len(matches) != 1:
        raise ConfigError("hardware", f"{name!r}; choose one of {sorted(ACCELERATORS)}")
    return replace(matches[0], **overrides)


def _read_mapping(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("hardware", f"{path} does not exist") from None
    if not isinstance(data, dict):
        raise ConfigError("hardware", f"{path} must hold a mapping")
    return data


def this_machine() -> dict[str, Any]:
    """CPU model, ISA, cores and memory of the machine this runs on."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "device": "cpu",
        "cpu_model": info.get("model name") or platform.processor() or "unknown",
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count() or 1,
        "memory_gib": round(_memory_bytes() / 2**30, 1),
        "platform": platform.platform(),
    }


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
