"""The built-in model folder: transformers loads it, creation is deterministic and safe to
race, greedy decoding is not degenerate, and llama.cpp's HF-vocab checks would accept it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.model import builtin
from pdserve.model.builtin import BUILTIN_MODEL_NAME, FILE_NAMES, create_builtin_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EXPECTED_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def hf_model(builtin_model_dir):
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        builtin_model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return model.eval()


def test_config_fields_are_exact(builtin_model_dir):
    config = json.loads((builtin_model_dir / "config.json").read_text())
    assert {k: config[k] for k in EXPECTED_CONFIG} == EXPECTED_CONFIG
    generation = json.loads((builtin_model_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 31999]}
    assert sorted(p.name for p in builtin_model_dir.iterdir()) == sorted(FILE_NAMES)


def test_transformers_loads_model_and_tokenizer(builtin_model_dir, hf_model):
    num_params = sum(p.numel() for p in hf_model.parameters())
    assert 50_000_000 <= num_params <= 60_000_000
    assert hf_model.config.num_key_value_heads == 4 and not hf_model.config.tie_word_embeddings
    tok = transformers.AutoTokenizer.from_pretrained(builtin_model_dir)
    assert len(tok) == 32000 and tok.is_fast
    text = "def main():\n    print('héllo 世界 🚀')\n"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_decoding_is_varied_and_well_separated(builtin_model_dir, hf_model):
    """Random Llamas often repeat one token forever; this init must not (see builtin.py)."""
    tok = transformers.AutoTokenizer.from_pretrained(builtin_model_dir)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(
            ids, max_new_tokens=24, do_sample=False, output_scores=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        changed = ids.clone()
        changed[0, 1] += 1  # a different first word
        other = hf_model.generate(
            changed, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    new_tokens = out.sequences[0, ids.shape[1] :].tolist()
    assert len(set(new_tokens)) >= 16, new_tokens
    top2 = torch.stack([torch.topk(s[0], 2).values for s in out.scores])
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-4  # far above float32 noise
    assert other[0, ids.shape[1] :].tolist() != new_tokens  # the context matters


def test_creation_is_deterministic(builtin_model_dir, tmp_path):
    again = create_builtin_model(tmp_path / "again", progress=False)
    for name in FILE_NAMES:
        assert sha256_of(again / name) == sha256_of(builtin_model_dir / name), name
    assert sorted(p.name for p in again.iterdir()) == sorted(FILE_NAMES)
    with pytest.raises(FileExistsError):
        create_builtin_model(again, progress=False)


def test_concurrent_ensure_creates_once(tmp_path):
    code = (
        "from pdserve.model.builtin import ensure_builtin_model\n"
        "print('DIR', ensure_builtin_model(progress=True))\n"
    )
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(tmp_path)}
    stale = tmp_path / "models" / f".{BUILTIN_MODEL_NAME}-v{builtin.BUILTIN_MODEL_VERSION}.crashed"
    stale.mkdir(parents=True)  # left by a creator that died mid-way
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    expected = tmp_path / "models" / f"{BUILTIN_MODEL_NAME}-v{builtin.BUILTIN_MODEL_VERSION}"
    assert [re.search(r"DIR (.*)", out).group(1) for out in outputs] == [str(expected)] * 2
    assert sum(out.count("training the") for out in outputs) == 1  # one creator, one waiter
    assert builtin.is_complete(expected)
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == []


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    assert builtin.builtin_model_dir() == tmp_path / "models" / f"{BUILTIN_MODEL_NAME}-v1"
    monkeypatch.delenv("PDSERVE_CACHE_DIR")
    assert builtin.builtin_model_dir().parent == Path.home() / ".cache" / "pdserve" / "models"


def test_tokenizer_passes_llama_cpp_hf_vocab_checks(builtin_model_dir):
    """What gguf-py's LlamaHfVocab requires (llama.cpp's converter for Llama HF tokenizers):
    BPE with byte_fallback, a Sequence decoder, not Llama-3-style, a fast AutoTokenizer, and
    no added tokens beyond the base vocabulary, so its token list matches config.vocab_size."""
    spec = json.loads((builtin_model_dir / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is True
    assert spec["decoder"]["type"] == "Sequence" and not spec["model"].get("ignore_merges")
    tok = transformers.AutoTokenizer.from_pretrained(builtin_model_dir)
    assert tok.is_fast and tok.vocab_size == 32000
    assert all(i < tok.vocab_size for i in tok.get_added_vocab().values())
    vocab = tok.get_vocab()
    byte_tokens = sorted(i for t, i in vocab.items() if re.fullmatch(r"<0x[0-9A-F]{2}>", t))
    assert byte_tokens == list(range(3, 259))
    assert "<0x0A>" in vocab  # has_newline_token
    config = json.loads((builtin_model_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_prefix_space"] is True
