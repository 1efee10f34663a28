"""Tokenizer equality with transformers 5 (the contract), on the built-in folder and on small
Llama-3-style and Qwen2-style byte-level tokenizers trained here; load errors; import cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.errors import InvalidRequestError, ModelLoadError
from pdserve.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "Hello, world! How are you?",
    "  leading spaces",
    "trailing spaces   ",
    "\n\nnewlines\nin the\r\nmiddle\n",
    "def add(x, y):\n    return x + y  # sum\n\tindented\n",
    "emoji 😀🎉👩‍💻 end",
    "中文字符测试，日本語のテキスト",
    "नमस्ते दुनिया",
    "cafe\u0301 decomposed vs café",
    "mixed 中文 and English 123456",
    "<s>bos in text</s>",
    "a<|im_start|>user\nhey<|im_end|>b",
    "<|begin_of_text|>x<|eot_id|>",
    "<|endoftext|> after",
    "<unk>",
    "",
    " ",
    "\n",
]

TRAIN_TEXT = "\n".join(TEXTS[:10] * 4) + (
    "The quick brown fox jumps over the lazy dog. "
    "for i in range(10): print(i)\nclass Foo(object):\n    pass\n"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim }}"
    "{{- '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
# Exercises trim_blocks/lstrip_blocks, namespace, tojson, loop controls and raise_exception.
QWEN2_TEMPLATE = """{%- if tools %}
<|im_start|>system
Tools:
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
<|im_end|>
{% endif %}
{%- set ns = namespace(count=0) %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
    {%- set ns.count = ns.count + 1 %}
<|im_start|>{{ message.role }}
{% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>
{% endif %}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Hi there 😀\n"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
    {"role": "user", "content": "中文? <|im_end|> ok", "name": None},
]
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


# ----------------------------------------------------------------------------- builders
def _train_byte_level(split_pattern: str, specials: list[str], nfc: bool, ignore_merges: bool):
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    return tok


def _save(tok, folder: Path, config_patch: dict, model_type: str | None, **kwargs) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(config_patch)
    config_file.write_text(json.dumps(config))
    if model_type is not None:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def make_llama3_folder(folder: Path, declared_class: str = "PreTrainedTokenizerFast") -> Path:
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    specials += ["<|start_header_id|>", "<|end_header_id|>"]
    tok = _train_byte_level(LLAMA3_SPLIT, specials, nfc=False, ignore_merges=True)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", 0)],
            ),
        ]
    )
    patch = {"tokenizer_class": declared_class, "add_bos_token": False}
    return _save(
        tok,
        folder,
        patch,
        "llama",
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_TEMPLATE,
    )


def make_qwen2_folder(
    folder: Path, config_patch: dict | None = None, nfc_in_json: bool = True
) -> Path:
    """Qwen2-style byte-level BPE. Without NFC in tokenizer.json, transformers' Qwen2Tokenizer
    still normalises (it rebuilds the pipeline), so we must too."""
    from tokenizers import processors

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _train_byte_level(QWEN2_SPLIT, specials, nfc=nfc_in_json, ignore_merges=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    patch = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, **(config_patch or {})}
    return _save(
        tok,
        folder,
        patch,
        "qwen2",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2_TEMPLATE,
    )


def make_legacy_llama2_folder(builtin_dir: Path, folder: Path) -> Path:
    """The built-in tokenizer re-serialised the way older Hub Llama-2 repos store it
    (Prepend/Replace normaliser, no pre-tokenizer): transformers ignores that and rebuilds a
    Metaspace pipeline, so must we."""
    folder.mkdir()
    spec = json.loads((builtin_dir / "tokenizer.json").read_text())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    spec["pre_tokenizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((builtin_dir / "tokenizer_config.json").read_text())
    config["legacy"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, builtin_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "builtin": builtin_model_dir,
        "llama3": make_llama3_folder(root / "llama3"),
        "llama3-declared-llama": make_llama3_folder(root / "llama3b", "LlamaTokenizerFast"),
        "qwen2": make_qwen2_folder(root / "qwen2"),
        "qwen2-add-bos": make_qwen2_folder(
            root / "qwen2b", {"add_bos_token": True, "bos_token": "<|endoftext|>"}
        ),
        "qwen2-no-nfc-json": make_qwen2_folder(root / "qwen2c", nfc_in_json=False),
        "llama2-legacy-json": make_legacy_llama2_folder(builtin_model_dir, root / "llama2"),
    }


@pytest.fixture(scope="module", params=sorted(["builtin", "llama3", "llama3-declared-llama",
    "qwen2", "qwen2-add-bos", "qwen2-no-nfc-json", "llama2-legacy-json"]))  # fmt: skip
def pair(request, folders):
    folder = folders[request.param]
    return transformers.AutoTokenizer.from_pretrained(folder), Tokenizer.from_pretrained(folder)


# -------------------------------------------------------------------------------- equality
def test_encode_matches_transformers(pair):
    hf, ours = pair
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, text
        assert (
            ours.encode(text, add_special_tokens=False)
            == hf(text, add_special_tokens=False).input_ids
        ), text


def test_decode_matches_transformers(pair):
    hf, ours = pair
    for text in TEXTS:
        ids = hf(text).input_ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)


def test_vocabulary_and_special_ids_match(pair):
    hf, ours = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.all_special_ids >= {i for i in hf.all_special_ids}
    for token_id in (0, 5, 300, ours.vocab_size - 1):
        assert ours.id_to_token(token_id) == hf.convert_ids_to_tokens(token_id)
        assert ours.token_to_id(ours.id_to_token(token_id)) == token_id
    assert ours.id_to_token(10**7) is None and ours.token_to_id("no such token ✗✗") is None


def test_chat_template_matches_transformers(pair):
    hf, ours = pair
    assert ours.chat_template == hf.chat_template
    messages = MESSAGES
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert ours.apply_chat_template(messages, False, tools=TOOLS) == expected


@pytest.mark.parametrize("json_from", ["builtin", "qwen2"])
@pytest.mark.parametrize(
    ("declared", "model_type"),
    [
        (None, "llama"),
        (None, "qwen2"),
        ("LlamaTokenizer", "llama"),
        ("LlamaTokenizerFast", None),
        ("LlamaTokenizer", "mistral"),
        ("LlamaTokenizer", "qwen3"),
        ("PreTrainedTokenizerFast", "llama"),
        ("PreTrainedTokenizerFast", "qwen2"),
        ("PreTrainedTokenizerFast", "qwen3"),
        ("Qwen2Tokenizer", None),
        ("Qwen2TokenizerFast", "llama"),
    ],
)
def test_class_resolution_follows_autotokenizer(folders, tmp_path, json_from, declared, model_type):
    """Which pipeline transformers rebuilds depends on the declared class and model type."""
    from pdserve.tokenizer.tokenizer import _resolve_class

    spec_text = (folders[json_from] / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(spec_text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": declared}))
    if model_type is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    hf_class = type(transformers.AutoTokenizer.from_pretrained(tmp_path)).__name__
    ours = _resolve_class(declared, model_type, json.loads(spec_text))
    emulated = {"LlamaTokenizer", "Qwen2Tokenizer"}
    assert (ours if ours in emulated else "as written") == (
        hf_class if hf_class in emulated else "as written"
    )


# --------------------------------------------------------------------- specific behaviour
def test_add_bos_token_follows_post_processor_not_config(folders):
    """transformers 5 drops add_bos_token when tokenizer.json exists: BOS comes only from the
    post-processor (Llama 3 adds one despite add_bos_token=false, Qwen2 adds none despite
    add_bos_token=true)."""
    llama3 = Tokenizer.from_pretrained(folders["llama3"])
    assert llama3.encode("hi")[0] == llama3.bos_token_id == llama3.token_to_id("<|begin_of_text|>")
    qwen2 = Tokenizer.from_pretrained(folders["qwen2-add-bos"])
    assert qwen2.bos_token_id is not None
    assert qwen2.encode("hi") == qwen2.encode("hi", add_special_tokens=False)
    assert Tokenizer.from_pretrained(folders["qwen2"]).bos_token_id is None


def test_builtin_tokenizer_shape(builtin_model_dir):
    tok = Tokenizer.from_pretrained(builtin_model_dir)
    assert tok.vocab_size == 32000
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 258)] == [
        "<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"
    ]  # fmt: skip
    assert (tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")) == (31998, 31999)
    assert tok.encode("Hello")[0] == 1
    assert tok.decode(tok.encode("x  y\n\tz 中文 😀")) == "x  y\n\tz 中文 😀"


def test_template_error_is_invalid_request(folders, tmp_path):
    tok = Tokenizer.from_pretrained(folders["qwen2"])
    with pytest.raises(InvalidRequestError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(InvalidRequestError):  # a role the builtin template cannot concatenate
        Tokenizer.from_pretrained(folders["builtin"]).apply_chat_template([{"role": 3}])
    (tmp_path / "tokenizer.json").write_text((folders["qwen2"] / "tokenizer.json").read_text())
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": ""}])


def test_template_sandbox_blocks_internals(folders):
    tok = Tokenizer.from_pretrained(folders["qwen2"])
    with pytest.raises(InvalidRequestError, match="unsafe"):
        tok.apply_chat_template([], chat_template="{{ messages.__class__.__mro__ }}")
    assert tok.apply_chat_template([], chat_template="{{ strftime_now('%Y') | length }}") == "4"


def test_missing_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_tokenizer_config_names_the_file(tmp_path, folders):
    (tmp_path / "tokenizer.json").write_text((folders["qwen2"] / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_chat_template_names_the_file(tmp_path, folders):
    (tmp_path / "tokenizer.json").write_text((folders["qwen2"] / "tokenizer.json").read_text())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m }")
    with pytest.raises(ModelLoadError, match=r"chat_template\.jinja"):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_tokenizer_json_and_missing_folder(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "absent")


def test_import_does_not_pull_torch_or_transformers():
    code = (
        "import sys, pdserve.tokenizer\n"
        "heavy = {'torch', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
