"""The built-in default model: a small Llama made on the machine, with no download.

Owns: the recipe for `pdserve-tiny-llama` (architecture, seeded weights, tokenizer trained
locally) and its cache folder. `ensure_builtin_model()` is what `pdserve serve` and the tests
call; it creates the folder on first use and returns it.

Contract: the folder is a regular Hugging Face checkpoint — `transformers` loads it with
`LlamaForCausalLM`/`AutoTokenizer`, and llama.cpp's converter accepts its tokenizer through
the Llama HF-vocab path. Creation is deterministic on a given machine (same Python standard
library, same torch): two runs give byte-identical files. It is atomic (built in a temporary
folder, then renamed) and safe to race: concurrent `ensure_builtin_model()` calls serialise
on a file lock and all but the first find the folder ready.

Why this recipe:
* Weights follow Hugging Face's Llama init (normal, std 0.02; RMSNorm gains ones) from one
  seeded `torch.Generator`, except two scales chosen after measuring greedy decoding:
  with std 0.02 everywhere attention is nearly uniform, so the next token is a function of a
  slowly moving context average and greedy output collapses into one token repeated ("made
  made made ...", 2-9 distinct tokens in 48). That hides KV-cache and position bugs, since a
  wrong cache yields the same repetition. q_proj/k_proj use std 0.1 (attention logits of
  std ~5: sharp, position-dependent attention), which gives 44-46 distinct tokens in 48 and
  output that changes when any early prompt token changes. lm_head uses std 0.1 (logit std
  ~2) so the top-2 gap of a greedy step is rarely small: median ~0.3, under 1e-2 in ~2% of
  steps, far above float32 noise (the tests check gap and variety on a real prompt).
* The tokenizer is a Llama-2-style byte-fallback BPE (Metaspace "▁", byte tokens, Fuse, Strip)
  trained with `tokenizers` on a fixed list of standard-library sources — text every machine
  has. `legacy: true` (prepend "▁" to every text segment, also after special tokens) is what
  Llama 2's SentencePiece and llama.cpp's SPM tokenizer do. NOTE: llama.cpp still splits
  text differently, because its converter (LlamaHfVocab) gives every piece the score -1000
  and SPM merges by score, not by BPE merge rank; compare with llama.cpp on token ids.
* The vocabulary is exactly 32000: ids 0-2 `<unk>` `<s>` `</s>`, 3-258 `<0x00>`..`<0xFF>`,
  learned pieces, and ChatML `<|im_start|>` `<|im_end|>` as the last two ids (listed as
  additional special tokens, so the GGUF marks them CONTROL).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILTIN_MODEL_NAME = "pdserve-tiny-llama"
BUILTIN_MODEL_VERSION = 1  # bump whenever the recipe below changes a byte of the output
WEIGHT_SEED = 20240917
INIT_STD = 0.02  # Hugging Face's initializer_range
# Larger init for these tensors keeps greedy decoding non-degenerate (see the docstring).
INIT_STD_OVERRIDES = {"q_proj": 0.1, "k_proj": 0.1, "lm_head": 0.1}
VOCAB_SIZE = 32000
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IM_START_ID, IM_END_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1
BOS_ID, EOS_ID = 1, 2

MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pretraining_tp": 1,
    "use_cache": True,
    "torch_dtype": "float32",
}
GENERATION_CONFIG = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID]}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Standard-library sources the tokenizer learns from, in this order. Names that a Python
# version lacks are skipped; the README of the folder records the corpus hash.
CORPUS_MODULES = (
    "pydoc_data/topics", "argparse", "ast", "calendar", "codecs", "collections/__init__",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
    "doctest", "enum", "fractions", "functools", "gettext", "glob", "gzip", "heapq",
    "inspect", "ipaddress", "json/decoder", "json/encoder", "locale", "logging/__init__",
    "mailbox", "os", "pathlib", "pickle", "platform", "pprint", "random", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "tokenize", "traceback", "typing", "zipfile", "_pydecimal", "turtle",
    "pydoc", "imaplib", "optparse", "ftplib", "email/message", "http/client", "http/server",
    "urllib/parse", "urllib/request", "unittest/case", "asyncio/base_events",
)  # fmt: skip
MAX_CORPUS_CHARS = 6_000_000
# Training words: newline runs, whitespace runs (kept apart from the next word), letters
# with an optional leading "▁", single digits (as Llama 2 splits digits), punctuation runs.
TRAIN_SPLIT_PATTERN = r"\n+|▁+(?=▁)|▁?\p{L}+|\p{N}|▁?[^\p{L}\p{N}▁\n]+|▁+"
FILE_NAMES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


# ---------------------------------------------------------------------------------- paths
def builtin_model_dir() -> Path:
    """Where the built-in model lives: $PDSERVE_CACHE_DIR or ~/.cache/pdserve, then models/."""
    root = os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve"
    return Path(root) / "models" / f"{BUILTIN_MODEL_NAME}-v{BUILTIN_MODEL_VERSION}"


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in FILE_NAMES)


def ensure_builtin_model(*, progress: bool = True) -> Path:
    """Create the built-in model on first use (once, even across processes); return its dir."""
    model_dir = builtin_model_dir()
    if is_complete(model_dir):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(model_dir.with_name(model_dir.name + ".lock")):
        if is_complete(model_dir):
            return model_dir  # another process made it while we waited
        # Holding the lock, anything half-made is left over from a crashed creator.
        for stale in [model_dir, *model_dir.parent.glob(f".{model_dir.name}.*")]:
            if stale.is_dir():
                log.warning("removing incomplete built-in model folder %s", stale)
                shutil.rmtree(stale)
        return create_builtin_model(model_dir, progress=progress)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------- creation
def create_builtin_model(out_dir: str | Path, *, progress: bool = True) -> Path:
    """Write the built-in model into `out_dir` (which must not exist) atomically; return it."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_model_files(tmp, progress)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("built-in model %s written to %s", BUILTIN_MODEL_NAME, out_dir)
    return out_dir


def _write_model_files(folder: Path, progress: bool) -> None:
    texts, corpus_sha = _read_corpus()
    _say(progress, f"training the {VOCAB_SIZE}-token tokenizer on {len(texts)} stdlib files")
    backend = _train_tokenizer(texts, progress)
    backend.save(str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    _write_json(folder / "special_tokens_map.json", _special_tokens_map())
    _write_json(folder / "config.json", MODEL_CONFIG)
    _write_json(folder / "generation_config.json", GENERATION_CONFIG)
    _write_weights(folder / "model.safetensors", progress)
    (folder / "README.md").write_text(_readme(corpus_sha, len(texts)), encoding="utf-8")
    for file in folder.iterdir():
        file.chmod(0o644)
        _fsync(file)  # the rename must never publish a file that is not on disk yet
    folder.chmod(0o755)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _say(progress: bool, message: str) -> None:
    log.info(message)
    if progress:
        print(f"[pdserve] {message}", flush=True)


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------ tokenizer
def _read_corpus() -> tuple[list[str], str]:
    """The training texts and the sha256 over them (the corpus fingerprint)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total, digest = [], 0, hashlib.sha256()
    for name in CORPUS_MODULES:
        path = next((p for p in _module_paths(stdlib, name) if p.is_file()), None)
        if path is None or total >= MAX_CORPUS_CHARS:
            continue
        text = path.read_text(encoding="utf-8")[: MAX_CORPUS_CHARS - total]
        texts.append(text)
        total += len(text)
        digest.update(text.encode("utf-8"))
    return texts, digest.hexdigest()


def _module_paths(stdlib: Path, name: str) -> tuple[Path, Path]:
    return stdlib / f"{name}.py", stdlib / name / "__init__.py"


def _chunks(texts: list[str], size: int = 4096) -> Iterator[str]:
    """Training sequences: each file cut at line ends into pieces of about `size` chars."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + size)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end


def _train_tokenizer(texts: list[str], progress: bool) -> Any:
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainee = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False),
            pre_tokenizers.Split(Regex(TRAIN_SPLIT_PATTERN), behavior="isolated"),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE - 2,
        special_tokens=specials,
        limit_alphabet=150,
        show_progress=progress,
    )
    trainee.train_from_iterator(_chunks(texts), trainer=trainer)
    model = json.loads(trainee.to_str())["model"]
    vocab = {**model["vocab"], IM_START: IM_START_ID, IM_END: IM_END_ID}
    merges = [tuple(pair) for pair in model["merges"]]
    return _assemble_llama_tokenizer(vocab, merges)


def _assemble_llama_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """The inference pipeline of an HF Llama-2 tokenizer.json around a trained vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    specials = ["<unk>", "<s>", "</s>", IM_START, IM_END]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _added_token(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_config() -> dict[str, Any]:
    ids = {"<unk>": 0, "<s>": BOS_ID, "</s>": EOS_ID, IM_START: IM_START_ID, IM_END: IM_END_ID}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in ids.items()},
        # Listed so transformers counts them in all_special_ids, which llama.cpp's converter
        # turns into CONTROL tokens (parsed as one token in prompts, EOT detection).
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }


def _special_tokens_map() -> dict[str, Any]:
    def entry(content: str) -> dict[str, Any]:
        fields = _added_token(content)
        del fields["special"]
        return fields

    return {
        "additional_special_tokens": [entry(IM_START), entry(IM_END)],
        "bos_token": entry("<s>"),
        "eos_token": entry("</s>"),
        "unk_token": entry("<unk>"),
    }


# -------------------------------------------------------------------------------- weights
def weight_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor in Hugging Face naming and generation order."""
    c = MODEL_CONFIG
    hidden, inter, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_dim, kv_dim = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (VOCAB_SIZE, hidden))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (q_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q_dim)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return [*shapes, ("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB_SIZE, hidden))]


def init_std(name: str) -> float:
    """The normal-init standard deviation of matrix `name`."""
    return next((std for key, std in INIT_STD_OVERRIDES.items() if key in name), INIT_STD)


def _write_weights(path: Path, progress: bool) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    tensors = {}
    for name, shape in tqdm(weight_shapes(), desc="weights", unit="tensor", disable=not progress):
        tensor = torch.empty(shape, dtype=torch.float32)
        if len(shape) == 1:
            tensors[name] = tensor.fill_(1.0)  # RMSNorm gains
        else:
            tensors[name] = tensor.normal_(0.0, init_std(name), generator=generator)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _readme(corpus_sha: str, num_files: int) -> str:
    c = MODEL_CONFIG
    overrides = ", ".join(f"{k} {v}" for k, v in INIT_STD_OVERRIDES.items())
    return f"""# {BUILTIN_MODEL_NAME} (v{BUILTIN_MODEL_VERSION})

pdserve's built-in default model, created on this machine by `pdserve.model.builtin` without
any download. **Its weights are random**: it writes fluent-looking nonsense and exists to
exercise the serving stack.

- Architecture: `LlamaForCausalLM`; hidden {c["hidden_size"]}, intermediate {c["intermediate_size"]},
  {c["num_hidden_layers"]} layers, {c["num_attention_heads"]} heads, {c["num_key_value_heads"]} KV heads,
  head_dim {c["head_dim"]}, vocab {VOCAB_SIZE}, untied embeddings, float32.
- Weights: seed {WEIGHT_SEED}; normal std {INIT_STD} ({overrides}); RMSNorm gains ones.
- Tokenizer: Llama-2-style byte-fallback BPE (`<unk>`=0, `<s>`=1, `</s>`=2, bytes 3-258,
  `{IM_START}`={IM_START_ID}, `{IM_END}`={IM_END_ID}), trained with `tokenizers` on
  {num_files} Python standard-library sources (corpus sha256 `{corpus_sha}`).
- Chat: ChatML template starting with `<s>`; generation stops at `</s>` or `{IM_END}`.

Delete this folder to have it rebuilt on next use.
"""
