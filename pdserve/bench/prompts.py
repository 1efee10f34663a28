"""Prompt text of a chosen token length, deterministic from a seed: `PromptText`.

Every workload and trace builds its prompts here, so that one rule holds everywhere:
a prompt's length is the number of tokens the *server* counts for it (special tokens such
as BOS included), which is what `usage.prompt_tokens` reports.

Text is plain lowercase words from `WORDS`, separated by single spaces. The words were
picked from the docstrings of Python's standard library (what the built-in model's
byte-level BPE was trained on) and kept only if each is exactly one token for that
tokenizer, also after a space. So for the built-in model a prompt of N words costs N
tokens plus BOS, with or without a tokenizer at hand, and most of these words are one
token in other common vocabularies too. The list is written out below, not read from the
installed Python, so the same seed gives the same bytes on every machine.

- Without a tokenizer, one word counts as one token and a prompt carries
  `ASSUMED_SPECIAL_TOKENS` more (the BOS a Llama-style tokenizer adds); counts are
  estimates and callers record `num_prompt_tokens=None`.
- With a `pdserve.tokenizer.Tokenizer`, each word's cost in context is measured once,
  the words are drawn to hit the target exactly, and the finished prompt is encoded to
  check; a tokenizer that merges across spaces is corrected by adding or dropping words,
  and the returned count is always the measured one.

Shared prefixes are byte-identical because callers build them once and reuse the string;
tails are joined with a single space, at which the built-in tokenizer never merges, so
the prefix's token ids are also a prefix of every prompt that extends it.
"""

from __future__ import annotations

import random
from typing import Any

ASSUMED_SPECIAL_TOKENS = 1  # BOS; the no-tokenizer estimate matches the built-in model
_MAX_FIXUP_ROUNDS = 8

# 508 single-token words of the built-in tokenizer, most frequent first.
WORDS: tuple[str, ...] = tuple(
    """
the and for file that with are not object from this string class return name will function
can list used number line data argument value all default module which given type instance
method self bytes path arguments one set other command when should use may mode current
returns text code must has any have read values first only using returned tuple directory
new message objects you its exception address integer called time lines but true then files
server same each two input filename error specified result into like key than open stream
methods output names call dictionary size encoding also named optional strings raise was
context where otherwise case format source socket more thread version option empty example
import passed raised defined single position sequence either defaults functions non
available user last frame response most attributes types standard print test does before
order containing block classes whether write without timeout item there until after port
get been zero between screen copy attribute operand header operation end close binary
errors system next both keyword section instead provided member help connection following
some they found archive start process possible parameter local form always flags writing
cannot range float already support program byte node reading their state level these
underlying buffer options parameters flag such package variable created second stack
characters variables except false contains run extension host request specific raw
descriptor prefix see modules negative numbers newline about instances statement color
being create interface sequences left subclass another root provides through way calling
point different keys part members based mapping base callable breakpoint locale over date
special written random added equal internal canvas count opened according positive
multiple examples including exist make namespace access supported present entry year width
would queue protocol match length mean exponent commands items want pickle generic threads
within matches change even frames out just python operations them bit messages generator
sign closed character specifies datetime check existing add how digits field abstract
global necessary event globals times round pair exists executed absolute contain tuples
original month table syntax network elements exceptions fields usage directly common calls
decimal bound once group needed omitted exit unless relative angle boolean regular useful
supports your via itself stop expression side runtime ignored iterator client since else
indicating iterable contents equivalent built details considered pathname while offset
chunk occurs results entries handle raises uses integers docstring readable indicates link
tests space trace day wrapped compare info cache enum shape pass place old need done
matching simple valid long whitespace strict parser lock work currently required per
ignore similar temporary generated were index those addresses encoded heading precision
override password lists paths three overridden removed total right week actual supplied
join rounding because arbitrary full points tree caller top printed complete hash cases
compile helper normal whose compressed target many exactly provide sample expected spaces
red complex means followed platform creating least try recent running reserved decorator
callback divide blocking power send seconds back site converted formatted maximum adds
tell assert initial blocks child release mouse imported append include browser determined
""".split()  # noqa: SIM905 -- a block of words reads better than 400 quoted strings
)


class PromptText:
    """Builds word text of exact (with a tokenizer) or estimated token lengths."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        if tokenizer is None:
            self.num_special_tokens = ASSUMED_SPECIAL_TOKENS
            self._cost = dict.fromkeys(WORDS, 1)
        else:
            self.num_special_tokens = len(tokenizer.encode(""))
            self._cost = _word_costs(tokenizer)
        self._unit_words = [w for w in WORDS if self._cost[w] == 1] or [min(WORDS, key=len)]

    @property
    def is_exact(self) -> bool:
        return self.tokenizer is not None

    # -- counting
    def count(self, prompt: str) -> int:
        """Tokens the server counts for `prompt` (measured, or estimated without a tokenizer)."""
        if self.tokenizer is None:
            return self.num_special_tokens + len(prompt.split())
        return len(self.tokenizer.encode(prompt))

    def count_chat(self, messages: list[dict[str, str]]) -> int | None:
        """Tokens of `messages` rendered by the chat template, as the server counts them;
        None without a tokenizer or template."""
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            return None
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def measured(self, num_tokens: int) -> int | None:
        """`num_tokens` if it was measured, None if it is an estimate: for `RequestSpec`."""
        return num_tokens if self.is_exact else None

    # -- building
    def word_list(self, rng: random.Random, num_tokens: int) -> list[str]:
        """Words whose costs add up to `num_tokens` (at least one word when num_tokens > 0)."""
        words: list[str] = []
        left = num_tokens
        while left > 0:
            word = rng.choice(WORDS)
            if self._cost[word] > left:
                word = rng.choice(self._unit_words)
            words.append(word)
            left -= self._cost[word]
        return words

    def words(self, rng: random.Random, num_tokens: int) -> str:
        """Text of `num_tokens` tokens on its own, special tokens not included."""
        return " ".join(self.word_list(rng, num_tokens))

    def trim(self, words: list[str], num_tokens: int) -> list[str]:
        """The longest leading run of `words` costing at most `num_tokens`."""
        total = 0
        for index, word in enumerate(words):
            total += self._cost[word]
            if total > num_tokens:
                return words[:index]
        return list(words)

    def prompt(
        self, rng: random.Random, num_tokens: int, head: str = "", head_tokens: int | None = None
    ) -> tuple[str, int]:
        """`head` (kept byte for byte) plus words, so the whole prompt counts `num_tokens`.

        Returns the prompt and its count (measured with a tokenizer, estimated without).
        `head_tokens` is `count(head)` when the caller knows it (saves encoding a shared
        head again). A head already at or over the target gets no words, except that an
        empty prompt always gets one.
        """
        if head_tokens is None:
            head_tokens = self.count(head) if head else self.num_special_tokens
        need = num_tokens - head_tokens
        tail = self.word_list(rng, max(need, 0 if head else 1))
        return self.finish(rng, head, tail, num_tokens)

    def finish(
        self, rng: random.Random, head: str, tail: list[str], num_tokens: int
    ) -> tuple[str, int]:
        """`head` + `tail` with the tail corrected until the prompt counts `num_tokens`.

        Only a tokenizer that merges across spaces needs corrections; the count returned
        is the last one measured, within a few tokens of the target in the worst case.
        """
        tail = list(tail)
        text = _join(head, tail)
        count = self.count(text)
        for _ in range(_MAX_FIXUP_ROUNDS if self.is_exact else 0):
            if count == num_tokens:
                break
            if count < num_tokens:
                tail += [rng.choice(self._unit_words) for _ in range(num_tokens - count)]
            else:
                tail = self.trim(tail, max(self._tail_cost(tail) - (count - num_tokens), 0))
            if not tail and not head:
                tail = [rng.choice(self._unit_words)]
            text = _join(head, tail)
            count = self.count(text)
        return text, count

    def _tail_cost(self, tail: list[str]) -> int:
        return sum(self._cost[word] for word in tail)


def _join(head: str, tail: list[str]) -> str:
    words = " ".join(tail)
    if not head:
        return words
    return f"{head} {words}" if words else head


def _word_costs(tokenizer: Any) -> dict[str, int]:
    """Each word's tokens after a space, as it appears inside a prompt."""
    base = len(tokenizer.encode("the", add_special_tokens=False))
    return {
        word: max(len(tokenizer.encode(f"the {word}", add_special_tokens=False)) - base, 1)
        for word in WORDS
    }
