"""Shared plumbing for the benchmark scripts: hardware facts, model facts, prompts, tables.

Every benchmark prints the machine, the model and the workload next to its numbers, so a
table pasted into docs/benchmarks.md stands on its own. Nothing here imports pdserve at
module level: the peer-only parts of a benchmark must run before the engine exists.
The llama.cpp helpers live here too because they are peer plumbing shared by scripts.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The engine's thread-pool settings (pdserve/__init__.py sets the same defaults), applied
# here because benchmarks import torch and numpy before pdserve and both read them at load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(os.environ.get("PEERS_DIR", REPO_ROOT.parent / "peers")).resolve()

# Running `python benchmarks/x.py` puts benchmarks/ on sys.path, not the repo root; fall back
# to the checkout when pdserve is not installed (make setup installs it editable).
if importlib.util.find_spec("pdserve") is None:
    sys.path.append(str(REPO_ROOT))


# ----------------------------------------------------------------------------- hardware


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The ISA flags the kernels care about (AVX-512, BF16, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def memory_gib() -> float | None:
    """Total RAM in GiB, or None when /proc/meminfo is unreadable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def hardware_info() -> dict:
    """What a reader needs to judge the numbers: CPU, cores, memory, torch and its threads."""
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    mem = memory_gib()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "isa": isa,
        "memory_gib": round(mem, 1) if mem else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def set_threads(num_threads: int) -> None:
    """Pin torch's intra-op pool so every engine in a comparison gets the same cores."""
    torch.set_num_threads(num_threads)
    os.environ["OMP_NUM_THREADS"] = str(num_threads)


def machine_load() -> float:
    """The 1-minute load average: a busy machine makes every number below it suspect."""
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------- model


def resolve_model_dir(model: str | None) -> Path:
    """The model folder to benchmark: the given path, or pdserve's built-in model."""
    if model:
        return Path(model).resolve()
    from pdserve.model.builtin import ensure_builtin_model

    return Path(ensure_builtin_model()).resolve()


def load_config(model_dir: Path) -> dict:
    """The checkpoint's config.json as a dict."""
    return json.loads((model_dir / "config.json").read_text())


def weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape for every safetensors file, read from headers without loading."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def num_elements(shape: Sequence[int]) -> int:
    """Product of a shape's dimensions."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def model_info(model_dir: Path) -> dict:
    """A one-line-per-fact summary of the checkpoint for the report header."""
    cfg = load_config(model_dir)
    params = sum(num_elements(s) for s in weight_shapes(model_dir).values())
    return {
        "path": str(model_dir),
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "params_millions": round(params / 1e6, 1),
        "hidden_size": cfg.get("hidden_size"),
        "intermediate_size": cfg.get("intermediate_size"),
        "num_layers": cfg.get("num_hidden_layers"),
        "num_heads": cfg.get("num_attention_heads"),
        "num_kv_heads": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
        "vocab_size": cfg.get("vocab_size"),
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def torch_dtype(name: str) -> torch.dtype:
    """Map the CLI's dtype name to torch's."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------- workload


def random_prompts(lengths: Sequence[int], vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, avoiding the low ids Llama tokenizers reserve for specials."""
    gen = torch.Generator().manual_seed(seed)
    low = min(100, vocab_size - 1)
    return [torch.randint(low, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def seeded_uniform(count: int, low: int, high: int, seed: int) -> list[int]:
    """`count` integers drawn uniformly from [low, high], reproducible from the seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=gen).tolist()


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall seconds of one call, and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` calls: noise on a shared machine only adds time."""
    return min(timed(fn)[0] for _ in range(repeats))


# ----------------------------------------------------------------------------- report


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, so the printed output pastes straight into docs/benchmarks.md."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    """Floats with sensible precision; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_header(title: str, sections: dict[str, dict]) -> None:
    """Title, then one `key: value` block per section (hardware, model, workload...)."""
    print(f"\n## {title}\n")
    for name, facts in sections.items():
        print(f"{name}:")
        for key, value in facts.items():
            print(f"  {key}: {value}")
    print()


def write_json(path: str | None, payload: dict) -> None:
    """Write the run's results as JSON when --json-out was given."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def goal_verdict(value: float | None, goal: float) -> str:
    """'met' or 'missed' against a ≥ goal, or 'n/a' without a measurement."""
    if value is None:
        return "n/a"
    return "met" if value >= goal else "missed"


# ----------------------------------------------------------------------------- llama.cpp


def llamacpp_bin(name: str) -> Path | None:
    """Path of a llama.cpp tool built by benchmarks/peers/build_llamacpp.sh, or None.
    `PDSERVE_LLAMACPP_BUILD` names another build folder (e.g. its `LLAMA_ISA=avx2` build)."""
    build = os.environ.get("PDSERVE_LLAMACPP_BUILD") or PEERS_DIR / "llama.cpp-build"
    path = Path(build) / "bin" / name
    return path if path.exists() else None


def llamacpp_converter() -> tuple[Path, Path] | None:
    """(python, convert_hf_to_gguf.py) from the peers venv and source tree, or None."""
    python = PEERS_DIR / "venv" / "bin" / "python"
    scripts = sorted(
        glob.glob(str(PEERS_DIR / "src" / "*" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"))
    )
    if not python.exists() or not scripts:
        return None
    return python, Path(scripts[-1])


def model_fingerprint(model_dir: Path) -> str:
    """Short hash of the checkpoint's files (name, size, mtime) to key the GGUF cache."""
    digest = hashlib.sha256(str(model_dir).encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def gguf_for(model_dir: Path, outtype: str) -> Path | None:
    """The model converted to GGUF (`f32` or `bf16`), cached under PEERS_DIR/gguf."""
    converter = llamacpp_converter()
    if converter is None:
        return None
    out = PEERS_DIR / "gguf" / f"{model_dir.name}-{model_fingerprint(model_dir)}-{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    python, script = converter
    tmp = out.with_suffix(".tmp")
    cmd = [str(python), str(script), str(model_dir), "--outtype", outtype, "--outfile", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"GGUF conversion failed ({outtype}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    shutil.move(tmp, out)
    return out
