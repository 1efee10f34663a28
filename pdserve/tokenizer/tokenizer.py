"""The text <-> token-id boundary: a Hugging Face tokenizer folder loaded without transformers.

Owns: reading a local tokenizer folder (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`, `chat_template.jinja`, `config.json` for the model type), encoding,
decoding and chat-template rendering.

Contract: for the same folder, `encode`, `decode` and `apply_chat_template` give exactly what
`transformers.AutoTokenizer` (v5) gives — `tok(text).input_ids`, `tok.decode(ids)` and
`tok.apply_chat_template(..., tokenize=False)`. The tests check this side by side.

Why it is built this way: the HTTP router imports this module, so it must not import torch or
transformers (seconds of start-up); the `tokenizers` library does the real work. Matching
transformers 5 takes three rules that are easy to miss:

* Special tokens (BOS/EOS) are added only by the post-processor in `tokenizer.json`; when
  that file exists transformers 5 drops `add_bos_token`/`add_eos_token` from the config.
* Some tokenizer classes (`LlamaTokenizer`, `Qwen2Tokenizer`) ignore the normalizer,
  pre-tokenizer and decoder written in `tokenizer.json` and rebuild them in code. We resolve
  the class as `AutoTokenizer` does for the model families we serve and rebuild the same way;
  any other class uses `tokenizer.json` as written.
* Chat templates run in an immutable jinja2 sandbox with transformers' globals and settings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from pdserve.errors import InvalidRequestError, ModelLoadError

NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# The class AutoTokenizer would pick from the model type when the folder names none, and
# the model types whose declared class it overrides. Only the families pdserve serves.
_CLASS_FOR_MODEL_TYPE = {
    "qwen2": "Qwen2Tokenizer",
    "qwen2_moe": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "qwen3_moe": "Qwen2Tokenizer",
    "mistral": "TokenizersBackend",
    "mixtral": "TokenizersBackend",
}
_CLASS_OVERRIDDEN_FOR_MODEL_TYPE = frozenset({"qwen2", "phi3"})

# Defaults a class's __init__ applies when the config does not name the token at all.
_CLASS_DEFAULT_TOKENS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "Qwen2Tokenizer": {
        "unk_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
}

_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------------------- file reading
def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ModelLoadError(path, "file not found (a tokenizer folder needs it)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object at the top level")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in a config: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_backend(path: Path) -> tuple[Backend, dict[str, Any]]:
    file = path / "tokenizer.json"
    spec = _read_json(file, required=True)
    try:
        backend = Backend.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ModelLoadError(file, f"not a valid tokenizers serialization: {exc}") from exc
    backend.no_truncation()
    backend.no_padding()
    return backend, spec


def _load_chat_templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named templates; a `chat_template.jinja` file wins over the config, as in transformers."""
    found: dict[str, tuple[str, Path]] = {}  # name -> (source, file it came from)
    raw, config_file = config.get("chat_template"), path / "tokenizer_config.json"
    if isinstance(raw, str):
        found["default"] = (raw, config_file)
    elif isinstance(raw, list):
        found.update({t["name"]: (t["template"], config_file) for t in raw if isinstance(t, dict)})
    extra_dir = path / "additional_chat_templates"
    for file in sorted(extra_dir.glob("*.jinja")) if extra_dir.is_dir() else []:
        found[file.stem] = (file.read_text(encoding="utf-8"), file)
    if (path / "chat_template.jinja").is_file():
        file = path / "chat_template.jinja"
        found["default"] = (file.read_text(encoding="utf-8"), file)
    for name, (source, file) in found.items():
        try:
            _compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(file, f"chat template {name!r} does not compile: {exc}") from exc
    return {name: source for name, (source, _) in found.items()}


# ------------------------------------------------------------- transformers class emulation
def _is_byte_level(spec: dict[str, Any]) -> bool:
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return '"ByteLevel"' in text


def _resolve_class(declared: str | None, model_type: str | None, spec: dict[str, Any]) -> str:
    """The tokenizer class `AutoTokenizer` (transformers 5) instantiates for this folder."""
    declared = declared.removesuffix("Fast") if declared else None
    registered = _CLASS_FOR_MODEL_TYPE.get(model_type or "")
    overridden = model_type in _CLASS_OVERRIDDEN_FOR_MODEL_TYPE
    if declared == "LlamaTokenizer" and not overridden and _is_byte_level(spec):
        return "TokenizersBackend"  # Llama-3 folders that still declare LlamaTokenizer
    if declared is None:
        return registered or "TokenizersBackend"
    if registered is None or registered in (declared, "TokenizersBackend"):
        return registered or declared
    return registered if overridden else declared


def _rebuild_llama(backend: Backend, config: dict[str, Any]) -> None:
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    if not add_prefix_space:
        scheme = "never"
    else:
        scheme = "always" if config.get("legacy", False) else "first"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=scheme, split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    backend.model.fuse_unk = True
    backend.model.byte_fallback = True
    backend.model.dropout = None


def _rebuild_qwen2(backend: Backend, config: dict[str, Any]) -> None:
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(
                add_prefix_space=bool(config.get("add_prefix_space") or False), use_regex=False
            ),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.model.fuse_unk = False
    backend.model.byte_fallback = False
    backend.model.dropout = None


def _special_tokens(cls: str, config: dict[str, Any], special_map: dict[str, Any]) -> dict:
    """Named special tokens as transformers resolves them (config, legacy map, class defaults)."""
    raw = {key: config[key] for key in NAMED_SPECIAL_TOKENS if key in config}
    if "added_tokens_decoder" not in config:
        raw.update({k: v for k, v in special_map.items() if k in NAMED_SPECIAL_TOKENS})
    for key, value in _CLASS_DEFAULT_TOKENS.get(cls, {}).items():
        raw.setdefault(key, value)
    return {key: _token_content(value) for key, value in raw.items()}


def _extra_special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> list[str]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if extra is None and "added_tokens_decoder" not in config:
        extra = special_map.get("additional_special_tokens")
    if isinstance(extra, dict):
        extra = list(extra.values())
    return [t for t in map(_token_content, extra or []) if t is not None]


def _add_missing_tokens(backend: Backend, config: dict[str, Any], specials: Iterable[str]) -> None:
    """Register the tokens transformers adds on load, in the order it adds them."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    declared = config.get("added_tokens_decoder") or {}
    for _, fields in sorted(declared.items(), key=lambda item: int(item[0])):
        if isinstance(fields, dict) and fields.get("content") not in present:
            kwargs = {k: v for k, v in fields.items() if k != "__type"}
            backend.add_tokens([AddedToken(**kwargs)])
            present.add(fields["content"])
    missing = [t for t in dict.fromkeys(specials) if t not in present]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True) for t in missing])


# ------------------------------------------------------------------------- chat templates
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body as is."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses dunder/underscore attributes (sandbox hardening)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# What rendering a template raises when the messages do not fit it (a bad request).
_TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env.from_string(source)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """Drop None fields and alias reasoning text under the names templates read."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


# ------------------------------------------------------------------------------ tokenizer
class Tokenizer:
    """A loaded tokenizer: encode/decode, special ids and chat template. Thread-safe reads."""

    def __init__(
        self,
        backend: Backend,
        special_tokens: dict[str, str | None],
        chat_templates: dict[str, str],
        clean_up_spaces: bool = False,
    ) -> None:
        self._backend = backend
        self._special_tokens = special_tokens
        self._chat_templates = chat_templates
        self._clean_up_spaces = clean_up_spaces and type(backend.model).__name__ != "BPE"
        self.chat_template: str | None = chat_templates.get("default")
        self.bos_token: str | None = special_tokens.get("bos_token")
        self.eos_token: str | None = special_tokens.get("eos_token")
        self.bos_token_id: int | None = self._id_or_none(self.bos_token)
        self.eos_token_id: int | None = self._id_or_none(self.eos_token)
        added = backend.get_added_tokens_decoder()
        self.all_special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(path, "not a directory")
        backend, spec = _load_backend(path)
        config = _read_json(path / "tokenizer_config.json", required=False) or {}
        special_map = _read_json(path / "special_tokens_map.json", required=False) or {}
        model_config = _read_json(path / "config.json", required=False) or {}
        cls_name = _resolve_class(
            config.get("tokenizer_class"), model_config.get("model_type"), spec
        )
        if cls_name == "LlamaTokenizer":
            _rebuild_llama(backend, config)
        elif cls_name == "Qwen2Tokenizer":
            _rebuild_qwen2(backend, config)
        specials = _special_tokens(cls_name, config, special_map)
        named = [t for t in specials.values() if t is not None]
        _add_missing_tokens(backend, config, named + _extra_special_tokens(config, special_map))
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        templates = _load_chat_templates(path, config)
        clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        return cls(backend, specials, templates, clean_up)

    # -- vocabulary
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, tok: str) -> int | None:
        return self._backend.token_to_id(tok)

    def _id_or_none(self, tok: str | None) -> int | None:
        return None if tok is None else self._backend.token_to_id(tok)

    # -- text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in token_ids]
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    # -- chat
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` to the prompt string (no tokenization), as transformers does.

        `tools`, `documents` and `chat_template` (a source or a template name) are recognised;
        every other keyword is passed to the template. Raises InvalidRequestError when the
        folder has no template or the template rejects the conversation.
        """
        tools = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        source = self._select_template(kwargs.pop("chat_template", None), tools)
        context = {
            **{k: v for k, v in self._special_tokens.items() if v is not None},
            **kwargs,
        }
        chat = [_template_message(dict(m)) for m in messages]
        try:
            return _compile_template(source).render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except _TEMPLATE_ERRORS as exc:  # the conversation does not fit the template
            raise InvalidRequestError(f"chat template error: {exc}", param="messages") from exc

    def _select_template(self, requested: str | None, tools: Any) -> str:
        if requested is not None:
            return self._chat_templates.get(requested, requested)
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template", param="messages")
        return self.chat_template


_CLEANUP_PAIRS = [(" " + p, p) for p in (".", "?", "!", ",", "n't", "'m", "'s", "'ve", "'re")]
_CLEANUP_PAIRS.insert(4, (" ' ", "'"))


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied to non-BPE models that ask for it)."""
    for old, new in _CLEANUP_PAIRS:
        text = text.replace(old, new)
    return text


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_fallback_value(token: str | None) -> int | None:
    """The byte a byte-fallback token like `<0xE4>` stands for, or None for other tokens."""
    match = _BYTE_TOKEN.fullmatch(token or "")
    return int(match.group(1), 16) if match else None
