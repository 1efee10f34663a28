"""Load a Hugging Face model folder: config, safetensors weights (single or sharded).

Only safetensors are read: a pickle-based `pytorch_model.bin` can run code when loaded, so
pdserve refuses it with an error saying how to convert. Every failure names the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pdserve.config import ModelConfig, read_json
from pdserve.errors import ModelLoadError
from pdserve.model import quant
from pdserve.model.llama import LlamaForCausalLM

INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(index_path, "no 'weight_map' object")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = (
            " (found pytorch_model.bin: pickle checkpoints are not loaded; convert to safetensors)"
            if (model_dir / "pytorch_model.bin").exists()
            else ""
        )
        raise ModelLoadError(model_dir, f"no *.safetensors weights{hint}")
    for path in files:
        if not path.is_file():
            raise ModelLoadError(path, f"file not found (listed in {INDEX_FILE})")
    return files


def iterate_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(path, f"cannot read safetensors file ({e})") from e


def load_model(
    model_dir: str | os.PathLike[str],
    dtype: torch.dtype,
    device: torch.device | str,
    max_len: int,
    config: ModelConfig | None = None,
    batch_invariant: bool = False,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(model_dir, "model folder not found")
    config = config or ModelConfig.from_pretrained(model_dir)
    files = weight_files(model_dir)
    model = LlamaForCausalLM(config, max_len=max_len, dtype=dtype, device=device)
    model.load_weights(iterate_weights(files))
    if quantization is not None:
        quant.quantize_model(model, quantization)
    else:
        model.finish_loading(batch_invariant)
    return model.eval()
