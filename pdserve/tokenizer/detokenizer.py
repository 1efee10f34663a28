"""Streaming detokenization: token ids in, text deltas out, one request at a time.

Owns: turning the ids a request generates into the text deltas the API streams.

Contract: the deltas concatenated equal `output_text`, and equal the output decoded in the
context of the prompt — `decode(prompt + output)` minus the prompt's text, wherever that is
well defined. A delta never ends in half a UTF-8 character: while the decoded tail ends in
U+FFFD (a byte-fallback or byte-level token that starts a multi-byte character) it is held
back, and `flush()` releases it at the end (as U+FFFD if it never completed).

Why it is built this way: decoding a token alone loses context ("▁world" decodes to "world"
at the start of a string, because Llama decoders strip that leading space), and decoding the
whole sequence each step costs O(length). Like vLLM's prefix/read offsets, we decode a small
window: the tokens emitted last (the context, up to `_read_offset`) followed by the tokens not
yet emitted; the delta is what the new tokens add to the context's text. Once a delta is
emitted, its tokens become the next context and everything before them is dropped, so memory
and per-token work stay O(window), not O(length).

NOTE: the window never starts inside a UTF-8 character. The Llama ByteFallback decoder turns
a *whole run* of byte tokens into U+FFFDs when any part of it is invalid, so a window cut in
the middle of a character would corrupt the rest of the run. The context only moves to the
end of text that decoded cleanly, and the initial prompt context is moved back over
continuation bytes. When the prompt ends mid-character, the character belongs to the output.
"""

from __future__ import annotations

from collections.abc import Iterable

from pdserve.tokenizer.tokenizer import Tokenizer, byte_fallback_value

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as context for the first output token (vLLM uses 5).
_NUM_PROMPT_CONTEXT_TOKENS = 6
# A UTF-8 character is at most 4 bytes, so at most 3 continuation tokens precede a boundary.
_MAX_CONTINUATION_BYTES = 3
# Safety valve: if this many tokens are pending and the text still ends in U+FFFD, the tail
# is not a character in progress; emit it rather than grow the window without bound.
_MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    """Per-request streaming decoder. Not thread-safe; one instance per request."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Iterable[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # With skip_special_tokens the decoder drops special ids before decoding, so removing
        # them up front gives the same text and keeps them out of the window.
        self._dropped_ids = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        # The window is self._token_ids: context tokens already emitted (or from the prompt)
        # up to _read_offset, then tokens not yet emitted.
        self._token_ids: list[int] = self._prompt_context(prompt_token_ids)
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode_window(self._read_offset)
        self.output_text = ""

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append generated ids; return the newly complete text ("" while a char is split)."""
        pieces = []
        for token_id in token_ids:
            if token_id in self._dropped_ids:
                continue
            self._token_ids.append(token_id)
            pieces.append(self._step(final=False))
        return self._emit("".join(pieces))

    def flush(self) -> str:
        """At the end of generation: release whatever is held back (U+FFFD if invalid)."""
        if self._read_offset == len(self._token_ids):
            return ""
        return self._emit(self._step(final=True))

    # -- internals
    def _prompt_context(self, prompt_token_ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in prompt_token_ids if i not in self._dropped_ids]
        start = max(len(ids) - _NUM_PROMPT_CONTEXT_TOKENS, 0)
        for _ in range(_MAX_CONTINUATION_BYTES):
            if start == 0 or not self._is_continuation_byte(ids[start]):
                break
            start -= 1
        return ids[start:]

    def _is_continuation_byte(self, token_id: int) -> bool:
        value = byte_fallback_value(self._tokenizer.id_to_token(token_id))
        return value is not None and 0x80 <= value <= 0xBF

    def _decode_window(self, end: int) -> str:
        window = self._token_ids[:end]
        return self._tokenizer.decode(window, skip_special_tokens=self._skip_special_tokens)

    def _step(self, final: bool) -> str:
        num_tokens = len(self._token_ids)
        new_text = self._decode_window(num_tokens)
        is_pending = num_tokens - self._read_offset < _MAX_PENDING_TOKENS
        if not final and is_pending and new_text.endswith(REPLACEMENT_CHAR):
            return ""  # a character is still being completed
        if new_text.startswith(self._prefix_text):
            delta = new_text[len(self._prefix_text) :]
            self._advance_window()
        else:
            delta = self._settle(new_text)
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode_window(self._read_offset)
        return delta

    def _settle(self, new_text: str) -> str:
        """The delta when the old window text is not a prefix of the new one.

        The old text ended in an incomplete character that the new tokens completed (the
        prompt ended mid-character): that character belongs to the output. The window start
        stays put, because the old read offset is inside the character.
        """
        # Byte-fallback runs decode to U+FFFD as a whole while incomplete, so look for the
        # last token boundary that decodes cleanly; byte-level tokens may straddle
        # characters (no clean boundary), but their decoding is local, so strip the U+FFFDs.
        # The longer candidate is the one the prompt fully determines.
        candidates = (self._clean_prefix_text(), self._prefix_text.rstrip(REPLACEMENT_CHAR))
        settled = [c for c in candidates if c is not None and new_text.startswith(c)]
        if settled:
            return new_text[len(max(settled, key=len)) :]
        # Invalid byte sequences can rewrite text already emitted; never repeat it, decode
        # the new tokens alone instead.
        new_ids = self._token_ids[self._read_offset :]
        self._advance_window()
        return self._tokenizer.decode(new_ids, skip_special_tokens=self._skip_special_tokens)

    def _clean_prefix_text(self) -> str | None:
        """The window's text up to the last token boundary before _read_offset that decodes
        without a trailing U+FFFD (at most a character's length back), or None."""
        for boundary in range(self._read_offset - 1, -1, -1):
            if self._read_offset - boundary > _MAX_CONTINUATION_BYTES + 1:
                return None
            text = self._decode_window(boundary)
            if not text.endswith(REPLACEMENT_CHAR):
                return text
        return None

    def _advance_window(self) -> None:
        """Emitted tokens become the context; drop everything before them."""
        del self._token_ids[: self._read_offset]
        self._read_offset = 0

    def _emit(self, delta: str) -> str:
        self.output_text += delta
        return delta
