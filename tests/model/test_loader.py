"""Loading Hugging Face folders: sharded safetensors equal unsharded ones; every broken
folder fails with `ModelLoadError` naming the file (or `ConfigError` naming the field)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve import LLM, SamplingParams
from pdserve.config import ModelConfig, RopeConfig
from pdserve.errors import ConfigError, ModelLoadError
from pdserve.model.loader import INDEX_FILE, load_model
from tests.helpers import make_hf_model_dir, torch_threads

KIND = "llama_gqa_llama3"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_hf_model_dir(tmp_path_factory.mktemp("single"), KIND)


@pytest.fixture(scope="module")
def pristine_sharded(tmp_path_factory) -> Path:
    return make_hf_model_dir(tmp_path_factory.mktemp("sharded"), KIND, max_shard_size="100KB")


@pytest.fixture
def checkpoint(pristine, tmp_path) -> Path:
    """A private copy of the unsharded checkpoint, free to break."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


@pytest.fixture
def sharded(pristine_sharded, tmp_path) -> Path:
    return Path(shutil.copytree(pristine_sharded, tmp_path / "model"))


def load(model_dir: Path):
    return load_model(model_dir, torch.float32, "cpu", max_len=512)


def greedy(model_dir: Path) -> list[list[int]]:
    llm = LLM(model_dir, skip_tokenizer_init=True, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(i, i + n))} for i, n in ((3, 5), (40, 70))]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def load_error(model_dir: Path, error=ModelLoadError) -> str:
    with pytest.raises(error) as info:
        load(model_dir)
    return str(info.value)


# ---- success -----------------------------------------------------------------------------


def test_sharded_checkpoint_loads_the_same_weights_and_outputs(pristine, pristine_sharded):
    shards = sorted(p.name for p in pristine_sharded.glob("*.safetensors"))
    assert (pristine_sharded / INDEX_FILE).is_file()
    assert len(shards) > 2
    single, multi = load(pristine).state_dict(), load(pristine_sharded).state_dict()
    assert single.keys() == multi.keys()
    for name, tensor in single.items():
        assert torch.equal(tensor, multi[name]), name
    assert greedy(pristine_sharded) == greedy(pristine)


def test_unknown_extra_tensors_are_ignored(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, path, metadata={"format": "pt"})
    load(checkpoint)


def test_weights_are_cast_to_the_requested_dtype(checkpoint):
    model = load_model(checkpoint, torch.bfloat16, "cpu", max_len=64)
    # On CPU with the kernels the model computes in float32 (llama.py): what multiplies the
    # activations directly (norm weights) is widened, holding the bfloat16 values exactly.
    widened = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert widened == (
        {n for n in dict(model.named_parameters()) if n.endswith("norm.weight")}
        if model.compute_dtype == torch.float32
        else set()
    )
    assert model.embed_tokens.dtype == torch.bfloat16
    expected = load_file(checkpoint / "model.safetensors")["model.norm.weight"]
    assert torch.equal(model.norm.weight, expected.to(torch.bfloat16).to(model.compute_dtype))


# ---- broken folders ----------------------------------------------------------------------


def test_missing_folder(tmp_path):
    assert "no-such-model" in load_error(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        LLM(tmp_path / "no-such-model", skip_tokenizer_init=True, num_kv_blocks=4)


def test_missing_config_json(checkpoint):
    (checkpoint / "config.json").unlink()
    message = load_error(checkpoint)
    assert "config.json" in message and "not found" in message
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        LLM(checkpoint, skip_tokenizer_init=True, num_kv_blocks=4)


@pytest.mark.parametrize(
    "content", ['{"model_type": "llama",', "\xff\xfe not json", "[1, 2, 3]"], ids=str
)
def test_malformed_config_json(checkpoint, content):
    (checkpoint / "config.json").write_bytes(content.encode("latin-1"))
    assert "config.json" in load_error(checkpoint)


def test_missing_shard_named_in_the_index(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (sharded / victim).unlink()
    message = load_error(sharded)
    assert victim in message and "not found" in message


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": {}}'])
def test_malformed_index(sharded, content):
    (sharded / INDEX_FILE).write_text(content)
    assert INDEX_FILE in load_error(sharded)


@pytest.mark.parametrize(
    "damage",
    ["half", "header only", "one byte short", "five bytes", "random bytes", "empty"],
)
def test_truncated_or_corrupt_safetensors(checkpoint, damage):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    header_len = 8 + int.from_bytes(data[:8], "little")
    broken = {
        "half": data[: len(data) // 2],
        "header only": data[:header_len],
        "one byte short": data[:-1],
        "five bytes": data[:5],
        "random bytes": os.urandom(4096),
        "empty": b"",
    }[damage]
    path.write_bytes(broken)
    assert "model.safetensors" in load_error(checkpoint)


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert shard.name in load_error(sharded)


def test_pytorch_bin_only_folder_is_refused_with_a_hint(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    torch.save(tensors, checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    message = load_error(checkpoint)
    assert "safetensors" in message and "pytorch_model.bin" in message


def test_no_weights_at_all(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    assert "safetensors" in load_error(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    assert "model.layers.1.mlp.up_proj.weight" in load_error(checkpoint)


def test_tensor_of_the_wrong_shape_is_named(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, path, metadata={"format": "pt"})
    message = load_error(checkpoint)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "shape" in message


# ---- unsupported configurations ----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"model_type": "gpt2"}, "model_type", "gpt2"),
        ({"model_type": None}, "model_type", "None"),
        ({"hidden_act": "gelu"}, "hidden_act", "gelu"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type", "yarn"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic"}}, "rope_type", "dynamic"),
        ({"num_attention_heads": None}, "num_attention_heads", "missing"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "3"),
        ({"vocab_size": 0}, "vocab_size", "positive"),
    ],
    ids=["gpt2", "no model_type", "gelu", "yarn", "legacy dynamic", "no heads", "kv 3", "vocab 0"],
)
def test_unsupported_config_names_the_field(checkpoint, changes, field, value):
    edit_config(checkpoint, **changes)
    with pytest.raises(ConfigError) as info:
        load(checkpoint)
    assert field in info.value.field
    assert value in str(info.value)
    with pytest.raises(ConfigError):
        LLM(checkpoint, skip_tokenizer_init=True, num_kv_blocks=4)


def test_legacy_rope_scaling_format_is_read():
    hf = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 4096,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    config = ModelConfig.from_hf(hf)
    assert config.rope == RopeConfig(
        theta=500000.0, rope_type="linear", factor=2.0, original_max_position_embeddings=4096
    )
    assert config.num_kv_heads == 4 and config.head_dim == 16


def test_written_checkpoint_config_is_read_as_written(pristine):
    config = ModelConfig.from_pretrained(pristine)
    assert config.rope.rope_type == "llama3"
    assert config.rope.factor == 8.0
    assert config.rope.original_max_position_embeddings == 64
    assert (config.num_heads, config.num_kv_heads, config.num_layers) == (4, 2, 3)
