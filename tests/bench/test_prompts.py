"""Prompt text of exact token lengths (`bench/prompts.py`): the word list, the built-in
tokenizer, and a fake tokenizer that merges across spaces to exercise the corrections."""

from __future__ import annotations

import random

import pytest

from pdserve.bench.prompts import WORDS, PromptText


@pytest.fixture(scope="module")
def tokenizer(builtin_model_dir):
    from pdserve.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(builtin_model_dir)


class MergingTokenizer:
    """BOS, one token per word, two for words over 6 letters, and "the the" as one token:
    costs are not additive, so only measuring and correcting hits a target."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [1] if add_special_tokens else []
        words = text.split()
        index = 0
        while index < len(words):
            if words[index : index + 2] == ["the", "the"]:
                ids.append(2)
                index += 2
                continue
            ids.extend([3] * (2 if len(words[index]) > 6 else 1))
            index += 1
        return ids


def test_words_are_distinct_single_tokens_of_the_builtin_tokenizer(tokenizer):
    assert len(set(WORDS)) == len(WORDS) >= 400
    for word in WORDS:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
        assert len(tokenizer.encode(f"the {word}", add_special_tokens=False)) == 2, word


@pytest.mark.parametrize("num_tokens", [1, 2, 17, 513, 2048])
def test_prompt_hits_the_target_exactly_with_the_builtin_tokenizer(tokenizer, num_tokens):
    text = PromptText(tokenizer)
    prompt, count = text.prompt(random.Random(num_tokens), num_tokens)
    assert prompt
    assert count == len(tokenizer.encode(prompt)) == max(num_tokens, 2)


def test_without_a_tokenizer_a_word_is_a_token_plus_bos(tokenizer):
    text = PromptText()
    prompt, count = text.prompt(random.Random(0), 300)
    assert count == 300
    assert len(prompt.split()) == 299
    assert text.measured(count) is None
    # the estimate is exact for the built-in model, and the text the same with or without it
    assert len(tokenizer.encode(prompt)) == 300
    assert PromptText(tokenizer).prompt(random.Random(0), 300)[0] == prompt


def test_head_is_kept_byte_for_byte_and_its_tokens_prefix_the_prompt(tokenizer):
    text = PromptText(tokenizer)
    head, _ = text.prompt(random.Random(1), 200, "document:")
    head = f"{head}\n\nquestion:"
    prompt, count = text.prompt(random.Random(2), len(tokenizer.encode(head)) + 20, head)
    assert prompt.startswith(head + " ")
    head_ids = tokenizer.encode(head)
    assert tokenizer.encode(prompt)[: len(head_ids)] == head_ids
    assert count == len(head_ids) + 20


@pytest.mark.parametrize("num_tokens", [5, 64, 333])
def test_corrections_hit_the_target_with_a_merging_tokenizer(num_tokens):
    tokenizer = MergingTokenizer()
    text = PromptText(tokenizer)
    for seed in range(5):
        prompt, count = text.prompt(random.Random(seed), num_tokens)
        assert count == len(tokenizer.encode(prompt)) == num_tokens


def test_trim_keeps_the_longest_leading_run_within_the_budget():
    text = PromptText(MergingTokenizer())  # "function" costs 2, "the" and "file" 1
    words = ["the", "function", "file", "the"]
    assert text.trim(words, 0) == []
    assert text.trim(words, 2) == ["the"]
    assert text.trim(words, 3) == ["the", "function"]
    assert text.trim(words, 99) == words
