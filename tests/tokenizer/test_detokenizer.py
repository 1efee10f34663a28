"""IncrementalDetokenizer invariants: deltas == output_text == the output decoded in the
context of the prompt; no delta ends in half a character; O(window) state."""

from __future__ import annotations

import json

import pytest

from pdserve.tokenizer import IncrementalDetokenizer, Tokenizer

FFFD = "\ufffd"
TEXTS = [
    "Hello world, this is plain ASCII.",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented\n",
    "def f(x):\n    return x * 2  # double\n",
    "emoji 😀🎉👩‍💻 and more 🚀",
    "中文字符测试，日本語のテキスト",
    "नमस्ते दुनिया",
    "mixed: naïve café — 中文 😀 done",
]


@pytest.fixture(scope="module")
def builtin_tokenizer(builtin_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(builtin_model_dir)


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory) -> Tokenizer:
    """A tiny GPT-2-style byte-level BPE: multi-byte characters split across tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    backend = Backend(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS * 3, trainer=trainer)
    folder = tmp_path_factory.mktemp("byte_level")
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(params=["builtin", "byte_level"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def stream(tok: Tokenizer, prompt: list[int], output: list[int], chunk: int = 1, **kw):
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [detok.add_tokens(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    deltas.append(detok.flush())
    return deltas, detok


def expected_output(tok: Tokenizer, prompt: list[int], output: list[int], skip=True) -> str:
    """The output decoded in context: decode(prompt + output) minus the prompt's text.

    When the prompt ends inside a character, that character belongs to the output, so the
    prompt's text is the longest text the prompt alone determines that the full decode
    starts with: a shorter prompt prefix's decode (byte-fallback runs turn to U+FFFD as a
    whole while incomplete) or the prompt's decode without trailing U+FFFD (byte-level
    tokens can straddle characters)."""
    full = tok.decode(prompt + output, skip_special_tokens=skip)
    prompt_text = tok.decode(prompt, skip_special_tokens=skip)
    candidates = [prompt_text.rstrip(FFFD)]
    for cut in range(len(prompt), max(len(prompt) - 8, 0) - 1, -1):
        candidates.append(tok.decode(prompt[:cut], skip_special_tokens=skip))
    settled = max((c for c in candidates if full.startswith(c) and not c.endswith(FFFD)), key=len)
    return full[len(settled) :]


@pytest.mark.parametrize("text", TEXTS)
def test_every_prompt_output_split_matches_decode_in_context(tokenizer, text):
    ids = tokenizer.encode(text)
    for split in range(len(ids) + 1):
        prompt, output = ids[:split], ids[split:]
        deltas, detok = stream(tokenizer, prompt, output)
        assert "".join(deltas) == detok.output_text == expected_output(tokenizer, prompt, output)
        assert all(FFFD not in d for d in deltas), (split, deltas)


@pytest.mark.parametrize("chunk", [2, 3, 7, 1000])
def test_chunked_additions_give_the_same_text(tokenizer, chunk):
    prompt = tokenizer.encode("Prompt: ")
    output = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    deltas, detok = stream(tokenizer, prompt, output, chunk=chunk)
    assert "".join(deltas) == detok.output_text == expected_output(tokenizer, prompt, output)


def test_context_restores_the_leading_space(builtin_tokenizer):
    ids = builtin_tokenizer.encode("Hello world")
    first_world = next(
        i for i, t in enumerate(ids) if builtin_tokenizer.id_to_token(t)[0] == "▁" and i > 1
    )
    detok = IncrementalDetokenizer(builtin_tokenizer, ids[:first_world])
    assert detok.add_tokens(ids[first_world:]).startswith(" ")
    assert builtin_tokenizer.decode(ids[first_world:])[0] != " "  # alone, the space is lost


def test_split_character_is_held_back_then_emitted_whole(builtin_tokenizer):
    tok = builtin_tokenizer
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    detok = IncrementalDetokenizer(tok, tok.encode("Smile:"))
    assert [detok.add_tokens([i]) for i in byte_ids] == ["", "", "", "😀"]
    assert detok.flush() == ""


def test_incomplete_tail_is_flushed_as_replacement(builtin_tokenizer):
    tok = builtin_tokenizer
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    ok = tok.encode("ok", add_special_tokens=False)
    assert detok.add_tokens(ok) != ""
    assert detok.add_tokens([tok.token_to_id("<0xE4>"), tok.token_to_id("<0xB8>")]) == ""
    assert detok.flush() == FFFD * 2
    assert detok.output_text.endswith(FFFD * 2) and detok.flush() == ""


def test_long_invalid_run_is_released_not_hoarded(builtin_tokenizer):
    tok = builtin_tokenizer
    stray = [tok.token_to_id("<0x80>")] * 40  # continuation bytes with no lead byte
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    before_flush = "".join(detok.add_tokens([i]) for i in stray)
    assert before_flush.startswith(FFFD * 16)  # released once the window hit its limit
    assert before_flush + detok.flush() == FFFD * 40 == detok.output_text


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(builtin_tokenizer, skip):
    tok = builtin_tokenizer
    im_end, eos = tok.token_to_id("<|im_end|>"), tok.eos_token_id
    output = [*tok.encode("Hi there", add_special_tokens=False), im_end]
    output += [*tok.encode(" again 中文", add_special_tokens=False), eos]
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hey"}]), False)
    _deltas, detok = stream(tok, prompt, output, skip_special_tokens=skip)
    assert detok.output_text == expected_output(tok, prompt, output, skip=skip)
    assert ("<|im_end|>" in detok.output_text) is (not skip)


def test_empty_prompt(tokenizer):
    output = tokenizer.encode(TEXTS[-1], add_special_tokens=False)
    _deltas, detok = stream(tokenizer, [], output)
    assert detok.output_text == tokenizer.decode(output)


def test_state_stays_a_small_window(builtin_tokenizer):
    tok = builtin_tokenizer
    detok = IncrementalDetokenizer(tok, tok.encode("start"))
    ids = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    for token_id in ids:
        detok.add_tokens([token_id])
        assert len(detok._token_ids) <= 8  # NOTE: O(window), whatever the length
    assert detok.output_text + detok.flush() == expected_output(tok, tok.encode("start"), ids)


def test_accepts_any_iterable_of_ids(builtin_tokenizer):
    detok = IncrementalDetokenizer(builtin_tokenizer, (i for i in [1]))
    assert detok.add_tokens(iter(builtin_tokenizer.encode("a b", False))) == "a b"
