"""Prompt token ids for simulated requests, from the same `RequestSpec`s `pdserve bench`
sends.

With a tokenizer (`--tokenizer DIR`, the served model's folder) prompts are encoded as
the router would encode them — completions with the tokenizer's special tokens, chat
`messages` through its chat template — so lengths and shared prefixes are exact.

Without one, a torch-free stand-in: BOS, then one id per whitespace-separated word (a
stable hash of the word). For the built-in model this is exact in length — the workloads
draw words that are single tokens of its tokenizer (`bench/prompts.py`) — and it keeps
what the prefix cache sees: prompts that share leading words share leading ids. Chat
messages become a role id, the words, and an end id per message (the template's shape,
not its exact tokens).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

from pdserve.bench.types import RequestSpec

BOS_ID = 1
ROLE_IDS = {"system": 3, "user": 4, "assistant": 5, "tool": 6}
END_ID = 2
FIRST_WORD_ID = 256
NUM_WORD_IDS = 30000


@functools.lru_cache(maxsize=1 << 16)
def word_id(word: str) -> int:
    return FIRST_WORD_ID + zlib.crc32(word.encode()) % NUM_WORD_IDS


def stand_in_ids(spec: RequestSpec) -> list[int]:
    if spec.prompt is not None and not isinstance(spec.prompt, str):
        return list(spec.prompt)
    if spec.prompt is not None:
        return [BOS_ID, *map(word_id, spec.prompt.split())]
    ids = [BOS_ID]
    for message in spec.messages or []:
        ids.append(ROLE_IDS.get(message.get("role", "user"), 7))
        ids.extend(map(word_id, message.get("content", "").split()))
        ids.append(END_ID)
    ids.append(ROLE_IDS["assistant"])  # the generation prompt
    return ids


class PromptEncoder:
    """Token ids of a spec's prompt, exact with a tokenizer, else the stand-in."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def encode(self, spec: RequestSpec) -> list[int]:
        if self.tokenizer is None:
            return stand_in_ids(spec)
        if spec.prompt is not None:
            if isinstance(spec.prompt, str):
                return list(self.tokenizer.encode(spec.prompt))
            return list(spec.prompt)
        text = self.tokenizer.apply_chat_template(spec.messages, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))
