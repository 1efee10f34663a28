"""Typed configuration: the model's architecture (read from a Hugging Face folder) and the
engine's knobs (cache size, batching limits, device, dtype).

Both are frozen dataclasses validated once at construction; an invalid value raises
`ConfigError` naming the field. Nothing writes to a config after it is built.

This module imports no torch: the router reads `ModelConfig` too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.errors import ConfigError, ModelLoadError

# Architectures whose weights and maths the Llama-family decoder in `model/llama.py` covers.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
KV_TIER_DTYPES = ("auto", "int8")
QUANTIZATIONS = ("int8",)  # weight formats `EngineConfig.quantization` accepts
KV_TIER_ADMISSIONS = ("all", "frequency")  # kvstore/admission.py


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only: the band between low and high frequency is smoothly interpolated.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        # transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                "rope_scaling.rope_type",
                f"{rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})",
            )
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get(
                    "original_max_position_embeddings", hf.get("max_position_embeddings", 8192)
                )
            ),
        )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The architecture of a Llama-family decoder, normalised across model types."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "num_key_value_heads",
                f"{self.num_kv_heads} does not divide num_attention_heads={self.num_heads}",
            )

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> ModelConfig:
        model_dir = Path(model_dir)
        hf = read_json(model_dir / "config.json")
        gen_path = model_dir / "generation_config.json"
        gen = read_json(gen_path) if gen_path.exists() else {}
        return cls.from_hf(hf, gen)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                "model_type",
                f"{model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError("hidden_act", f"{hf['hidden_act']!r} is not supported (only silu)")
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            head_dim = hf.get("head_dim") or hidden // num_heads
            window = hf.get("sliding_window")
            if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
                window = None
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                rope=RopeConfig.from_hf(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                o_bias=model_type in ("llama", "mistral") and bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                sliding_window=int(window) if window else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_eos_ids(hf, generation or {}),
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            )
        except KeyError as e:
            raise ConfigError(str(e.args[0]), "missing from config.json") from e


def _eos_ids(hf: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    # generation_config.json is what `generate` honours; config.json is the fallback.
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(int(x) for x in (eos if isinstance(eos, list) else [eos]))


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning a missing or malformed file into a `ModelLoadError`."""
    if not path.is_file():
        raise ModelLoadError(path, "file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"malformed JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object at top level")
    return data


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Knobs of one engine instance. Defaults suit the built-in model on a small CPU box."""

    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    # KV pool size: an explicit block count wins over a memory budget.
    num_kv_blocks: int | None = None
    kv_cache_memory_gib: float = 2.0
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    # The per-step token budget. None: 2048 with chunked prefill, else max_model_len.
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    seed: int = 0  # seeds requests that carry no seed of their own
    # Tiered KV store below the device pool (pdserve/kvstore/), every tier off by default:
    # on a CPU device host RAM *is* the pool's memory (a bigger kv_cache_memory_gib serves
    # better than a copy), and disk or Redis need a place the operator chooses.
    kv_host_cache_gib: float = 0.0  # host RAM tier; 0: off
    kv_disk_cache_dir: str | None = None  # local disk tier (persists across restarts)
    kv_disk_cache_gib: float = 16.0  # the disk tier's size cap
    kv_redis_url: str | None = None  # shared Redis tier, e.g. redis://127.0.0.1:6379/0
    kv_tier_dtype: str = "auto"  # auto: the pool's dtype | int8 (per block and head)
    # Which blocks enter the slow tiers (disk, Redis): all (write-through of every block)
    # | frequency (a prefix chain seen kv_tier_admission_threshold times; kvstore/admission.py)
    kv_tier_admission: str = "all"
    kv_tier_admission_threshold: int = 2
    # The Redis tier's MAC key: set by a worker from the cluster key (ipc/security.py), never
    # a flag or printed; None: unkeyed checksums (offline use, --insecure-no-curve).
    kv_tier_secret: bytes | None = field(default=None, repr=False)
    # A row's logits bitwise independent of its batch (size, other rows, position, chunking,
    # decode vs prefill): CPU float32 kernels with one fixed summation order per output
    # element (see docs/architecture.md, "Batch-invariant mode").
    batch_invariant: bool = False
    # Weights stored in 8 bits (pdserve/model/quant.py): lossy, so None (the checkpoint's
    # precision, `dtype`) unless asked for.
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError("dtype", f"{self.dtype!r}; choose one of {SUPPORTED_DTYPES}")
        positive = ("block_size", "max_num_seqs")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        for name in ("num_kv_blocks", "max_num_batched_tokens", "max_model_len", "num_threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(name, f"must be positive, got {value}")
        if self.kv_cache_memory_gib <= 0:
            raise ConfigError("kv_cache_memory_gib", "must be positive")
        self._check_kv_tiers()
        self._check_batch_invariant()
        self._check_quantization()

    def _check_quantization(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                "quantization", f"{self.quantization!r}; one of {QUANTIZATIONS} (or unset)"
            )
        if self.quantization is not None and self.batch_invariant:
            raise ConfigError("quantization", "cannot be combined with batch_invariant")

    def _check_batch_invariant(self) -> None:
        if not self.batch_invariant:
            return
        if self.device.split(":")[0] != "cpu":
            raise ConfigError(
                "batch_invariant",
                f"is implemented for device 'cpu' only, not {self.device!r}",
            )
        if self.dtype != "float32":
            raise ConfigError(
                "batch_invariant", f"is implemented for dtype 'float32' only, not {self.dtype!r}"
            )

    def _check_kv_tiers(self) -> None:
        if self.kv_host_cache_gib < 0:
            raise ConfigError("kv_host_cache_gib", "must be 0 (off) or positive")
        if self.kv_disk_cache_gib <= 0:
            raise ConfigError("kv_disk_cache_gib", "must be positive")
        if self.kv_tier_dtype not in KV_TIER_DTYPES:
            raise ConfigError("kv_tier_dtype", f"{self.kv_tier_dtype!r}; one of {KV_TIER_DTYPES}")
        if self.kv_tier_admission not in KV_TIER_ADMISSIONS:
            raise ConfigError(
                "kv_tier_admission", f"{self.kv_tier_admission!r}; one of {KV_TIER_ADMISSIONS}"
            )
        if self.kv_tier_admission_threshold < 1:
            raise ConfigError("kv_tier_admission_threshold", "must be at least 1")
        if self.kv_disk_cache_dir == "":
            raise ConfigError("kv_disk_cache_dir", "empty path (leave unset to turn it off)")
        if self.has_kv_tiers and not self.enable_prefix_caching:
            raise ConfigError("enable_prefix_caching", "must be on when a KV tier is configured")

    @property
    def has_kv_tiers(self) -> bool:
        """True when any KV tier below the device pool is configured."""
        return bool(self.kv_host_cache_gib > 0 or self.kv_disk_cache_dir or self.kv_redis_url)
