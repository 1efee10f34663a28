"""OpenAI response bodies and stream chunks, built from what the engine client returns.

Owns: turning `RequestOutput`s (non-streaming) and `StreamUpdate`s (streaming) into
`/v1/completions` and `/v1/chat/completions` JSON, including both logprobs formats and
`echo`. No I/O here: `serving.py` drives the generation and calls these; the split keeps the
JSON rules testable and each file short.

Choice indices follow OpenAI: with several prompts, choice `prompt_index * n + sample_index`.

Token text in logprobs: a token is shown as the text it adds inside running text (`" SPA"`,
with its leading space), found by decoding it after an anchor token and cutting the anchor's
text off; decoding it alone would lose the space, since Llama decoders strip a leading space
at the start of a string. A byte-fallback token (`<0xE4>`, part of a multi-byte character)
reads as U+FFFD and reports its real byte in `bytes`, so a client can join the bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pdserve.outputs import Logprob, RequestOutput, StreamUpdate
from pdserve.router.protocol import (
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    sse_event,
)
from pdserve.tokenizer import Tokenizer
from pdserve.tokenizer.tokenizer import byte_fallback_value

TokenLogprobs = dict[int, Logprob]


class TokenTexts:
    """Text and UTF-8 bytes of single tokens as they read inside running text; cached."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._anchor_ids = tokenizer.encode("a", add_special_tokens=False)
        self._anchor_text = self._decode(self._anchor_ids)
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._text_in_context(token_id)
        return text

    def utf8_bytes(self, token_id: int) -> list[int]:
        value = byte_fallback_value(self._tokenizer.id_to_token(token_id))
        return [value] if value is not None else list(self.text(token_id).encode())

    def _text_in_context(self, token_id: int) -> str:
        text = self._decode([*self._anchor_ids, token_id])
        if text.startswith(self._anchor_text):
            return text[len(self._anchor_text) :]
        return self._decode([token_id])

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=False)

    # -- the two logprobs formats
    def completion_logprobs(
        self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], text_offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """OpenAI's legacy object for these tokens, whose text starts at `text_offset`;
        returns it with the offset after them. `top_logprobs` holds the sampled token and
        the top alternatives (up to logprobs + 1 entries, as OpenAI documents)."""
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs, strict=True):
            text = self.text(token_id)
            result.tokens.append(text)
            result.token_logprobs.append(entry[token_id].logprob)
            ranked = sorted(entry.items(), key=lambda item: item[1].rank)
            result.top_logprobs.append({self.text(t): lp.logprob for t, lp in ranked})
            result.text_offset.append(text_offset)
            text_offset += len(text)
        return result, text_offset

    def chat_logprobs(
        self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], num_top: int
    ) -> ChatLogprobs:
        """`logprobs.content` for these tokens: exactly the `num_top` most likely tokens in
        `top_logprobs` (the sampled one may or may not be among them)."""
        content = []
        for token_id, entry in zip(token_ids, logprobs, strict=True):
            ranked = sorted(entry.items(), key=lambda item: item[1].rank)
            top = [self._top(t, lp) for t, lp in ranked if lp.rank <= num_top][:num_top]
            sampled = self._top(token_id, entry[token_id])
            content.append(ChatTokenLogprob(**sampled.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)

    def _top(self, token_id: int, logprob: Logprob) -> TopLogprob:
        return TopLogprob(
            token=self.text(token_id), logprob=logprob.logprob, bytes=self.utf8_bytes(token_id)
        )


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every body or chunk of one HTTP request repeats."""

    request_id: str
    model: str
    created: int
    n: int  # samples per prompt
    num_logprobs: int | None  # None: logprobs not requested


# -- non-streaming --------------------------------------------------------------------------


def completion_response(
    meta: ResponseMeta,
    outputs: Sequence[RequestOutput],
    echo_texts: Sequence[str] | None,
    texts: TokenTexts,
    usage: UsageInfo,
) -> CompletionResponse:
    choices = []
    for prompt_index, output in enumerate(outputs):
        prefix = echo_texts[prompt_index] if echo_texts is not None else ""
        for sample in output.outputs:
            logprobs = None
            if meta.num_logprobs is not None and sample.logprobs is not None:
                logprobs, _ = texts.completion_logprobs(
                    sample.token_ids, sample.logprobs, len(prefix)
                )
            choices.append(
                CompletionResponseChoice(
                    index=prompt_index * meta.n + sample.index,
                    text=prefix + sample.text,
                    logprobs=logprobs,
                    finish_reason=sample.finish_reason,
                )
            )
    return CompletionResponse(
        id=meta.request_id, created=meta.created, model=meta.model, choices=choices, usage=usage
    )


def chat_response(
    meta: ResponseMeta, output: RequestOutput, texts: TokenTexts, usage: UsageInfo
) -> ChatCompletionResponse:
    choices = []
    for sample in output.outputs:
        logprobs = None
        if meta.num_logprobs is not None and sample.logprobs is not None:
            logprobs = texts.chat_logprobs(sample.token_ids, sample.logprobs, meta.num_logprobs)
        choices.append(
            ChatCompletionResponseChoice(
                index=sample.index,
                message=ChatResponseMessage(content=sample.text),
                logprobs=logprobs,
                finish_reason=sample.finish_reason,
            )
        )
    return ChatCompletionResponse(
        id=meta.request_id, created=meta.created, model=meta.model, choices=choices, usage=usage
    )


# -- streaming ------------------------------------------------------------------------------


class CompletionChunks:
    """SSE chunks of a `/v1/completions` stream: one choice per chunk, as OpenAI sends."""

    def __init__(
        self, meta: ResponseMeta, echo_texts: Sequence[str] | None, texts: TokenTexts
    ) -> None:
        self.meta = meta
        self._echo_texts = echo_texts
        self._texts = texts
        self._text_offsets: dict[int, int] = {}  # per choice; present once it has started

    def opening(self) -> Iterator[str]:
        return iter(())

    def events(self, prompt_index: int, update: StreamUpdate) -> Iterator[str]:
        for delta in update.deltas:
            choice = prompt_index * self.meta.n + delta.index
            text = delta.text
            if choice not in self._text_offsets:  # echo goes before the choice's first text
                text = (self._echo_texts[prompt_index] if self._echo_texts else "") + text
                self._text_offsets[choice] = len(text) - len(delta.text)
            logprobs = None
            if self.meta.num_logprobs is not None and delta.logprobs is not None:
                logprobs, self._text_offsets[choice] = self._texts.completion_logprobs(
                    delta.token_ids, delta.logprobs, self._text_offsets[choice]
                )
            if text or delta.finish_reason is not None or (logprobs and logprobs.tokens):
                yield sse_event(
                    self._chunk(
                        [
                            CompletionResponseChoice(
                                index=choice,
                                text=text,
                                logprobs=logprobs,
                                finish_reason=delta.finish_reason,
                            )
                        ]
                    )
                )

    def usage_event(self, usage: UsageInfo) -> str:
        return sse_event(self._chunk([], usage))

    def _chunk(self, choices, usage: UsageInfo | None = None) -> CompletionStreamResponse:
        meta = self.meta
        return CompletionStreamResponse(
            id=meta.request_id, created=meta.created, model=meta.model, choices=choices, usage=usage
        )


class ChatChunks:
    """SSE chunks of a `/v1/chat/completions` stream: a role delta per choice first, then
    content deltas, the last one of each choice carrying its `finish_reason`."""

    def __init__(self, meta: ResponseMeta, texts: TokenTexts) -> None:
        self.meta = meta
        self._texts = texts

    def opening(self) -> Iterator[str]:
        for index in range(self.meta.n):
            delta = DeltaMessage(role="assistant", content="")
            yield sse_event(self._chunk([ChatCompletionStreamChoice(index=index, delta=delta)]))

    def events(self, prompt_index: int, update: StreamUpdate) -> Iterator[str]:
        for delta in update.deltas:
            logprobs = None
            if self.meta.num_logprobs is not None and delta.logprobs is not None:
                logprobs = self._texts.chat_logprobs(
                    delta.token_ids, delta.logprobs, self.meta.num_logprobs
                )
            has_logprobs = logprobs is not None and bool(logprobs.content)
            if not delta.text and delta.finish_reason is None and not has_logprobs:
                continue
            choice = ChatCompletionStreamChoice(
                index=delta.index,
                delta=DeltaMessage(content=delta.text or None),
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
            )
            yield sse_event(self._chunk([choice]))

    def usage_event(self, usage: UsageInfo) -> str:
        return sse_event(self._chunk([], usage))

    def _chunk(self, choices, usage: UsageInfo | None = None) -> ChatCompletionStreamResponse:
        meta = self.meta
        return ChatCompletionStreamResponse(
            id=meta.request_id, created=meta.created, model=meta.model, choices=choices, usage=usage
        )
