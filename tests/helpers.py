"""Builders shared by the engine, model and kv tests.

- `make_request(...)`: an engine `Request` with distinct prompt tokens unless told otherwise.
- `make_hf_model_dir(tmp_path, kind)`: a tiny Hugging Face checkpoint written with
  transformers' own `save_pretrained`, random but reproducible; the HF-equivalence oracle
  and the loader tests read it back.
- `hf_greedy(model_dir, prompts, max_new_tokens)`: the reference continuation from
  transformers' `generate`, one prompt at a time (batch 1, no padding).

Model weights use `initializer_range=0.2`: with transformers' default 0.02 the top-2 logits
are nearly tied (float32 noise could flip a greedy pick) and greedy output collapses into a
repeated token, which hides position and KV-cache bugs; 0.1 still collapsed for the tied
Qwen2. At 0.2 the smallest top-2 gap over the oracle's greedy steps was ~2e-3 when measured,
far above the float32 difference between two implementations, and outputs vary. Also random
RMSNorm gains (HF inits them to 1, which would hide a norm loaded from the wrong tensor)
and random biases where the architecture has them (HF inits them to 0, which would hide a
bias loaded into the wrong rows).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pdserve.engine.request import Request
from pdserve.sampling_params import SamplingParams

# Unique prompt tokens per `make_request(num_tokens)` call, so unrelated requests never
# share a cached prefix by accident.
_token_base = itertools.count(10_000, 1_000)

# One small architecture per kind; vocab >= 500 so greedy picks are not trivially repeated.
_BASE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-6,
}
MODEL_KINDS: dict[str, dict[str, Any]] = {
    "llama_mha": {"model_type": "llama", "num_key_value_heads": 4},
    "llama_gqa_llama3": {
        "model_type": "llama",
        "num_key_value_heads": 2,
        "num_hidden_layers": 3,
        # A small original length so the scaling changes positions our prompts reach.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "llama_linear": {
        "model_type": "llama",
        "num_key_value_heads": 1,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
    },
    "qwen2_tied": {"model_type": "qwen2", "num_key_value_heads": 2, "tie_word_embeddings": True},
    # head_dim 32 with hidden 64 and 4 heads: q is wider than the residual stream.
    "qwen3_qk_norm": {"model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 32},
    "llama_biases": {
        "model_type": "llama",
        "num_key_value_heads": 2,
        "head_dim": 32,
        "attention_bias": True,
        "mlp_bias": True,
    },
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run with `num_threads` intra-op threads, then restore the previous setting.

    The tiny test models run one thread: on the 2 shared cores of the test machines, two
    OpenMP threads spin-waiting against other processes made a generate call ~70x slower
    (7.4 s instead of 0.1 s when measured under load).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_request(
    prompt: int | Sequence[int] = 8,
    request_id: str = "r0",
    *,
    max_tokens: int = 16,
    eos_token_ids: tuple[int, ...] = (),
    priority: int = 0,
    arrival_time: float = 0.0,
    **params: Any,
) -> Request:
    """A request whose prompt is `prompt` (token ids) or `prompt` fresh distinct ids."""
    if isinstance(prompt, int):
        base = next(_token_base)
        prompt_token_ids = list(range(base, base + prompt))
    else:
        prompt_token_ids = list(prompt)
    params.setdefault("max_tokens", max_tokens)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=SamplingParams(**params),
        eos_token_ids=eos_token_ids,
        max_tokens=max_tokens,
        priority=priority,
        arrival_time=arrival_time,
    )


def make_engine_core(model_dir: Path, allocator=None, **config: Any):
    """An `EngineCore` on a local model folder with `EngineConfig(**config)`."""
    from pdserve.config import EngineConfig, ModelConfig
    from pdserve.engine.core import EngineCore

    model_config = ModelConfig.from_pretrained(model_dir)
    return EngineCore(model_dir, model_config, EngineConfig(**config), allocator)


def make_hf_model(kind: str, seed: int = 0, **overrides: Any):
    """A randomly initialised transformers model of `kind` (see MODEL_KINDS), in float32."""
    import torch
    import transformers

    spec = {**_BASE, **MODEL_KINDS[kind], **overrides}
    model_type = spec.pop("model_type")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[model_type]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config_cls(**spec)).float().eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
                elif name.endswith(".bias"):
                    param.copy_(0.2 * torch.randn_like(param))
    return model


def make_hf_model_dir(
    tmp_path: Path,
    kind: str,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer_from: Path | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny checkpoint of `kind` with `save_pretrained` into `tmp_path / kind`.

    `tokenizer_from` copies a tokenizer folder's files in (the vocab sizes must agree).
    """
    model_dir = Path(tmp_path) / kind
    model = make_hf_model(kind, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(model_dir, **kwargs)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            shutil.copy(Path(tokenizer_from) / name, model_dir / name)
    return model_dir


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (batch 1, exactly max_new_tokens)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return hf_model_greedy(model.eval(), prompts, max_new_tokens)


def hf_model_greedy(
    model, prompts: list[list[int]], max_new_tokens: int, cache: Callable | None = None
) -> list[list[int]]:
    """`hf_greedy` with a transformers model already in memory; `cache()` makes each
    prompt's KV cache (default: transformers' own)."""
    import torch

    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            input_ids = torch.tensor([prompt])
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=0,
                **({"past_key_values": cache()} if cache is not None else {}),
            )
            outputs.append(generated[0, len(prompt) :].tolist())
    return outputs
