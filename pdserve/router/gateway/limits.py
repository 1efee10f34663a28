"""Input limits: what a request may ask for, checked before any work is done.

Owns: the body size cap (413), the per-request limits of `GatewayConfig` (n, prompts,
stop strings, stop token ids, prompt bytes), the refusal of OpenAI fields pdserve does not
implement but that change what a request means, and running tokenisation off the event
loop.

Order, cheapest first, so a hostile request costs little:
1. `read_body`: Content-Length over `max_body_bytes` -> 413 before a byte is read; a
   chunked body is counted while it is read and refused the moment it passes the cap.
2. Parsing (`router/protocol.py`): types, finite floats, integers within int64.
3. `check_limits`: counts and lengths, and the prompt's UTF-8 size against
   `max_prompt_bytes` — the context length times the longest token's bytes — so a prompt
   that cannot fit the context is refused without tokenising megabytes.
4. Tokenisation and chat-template rendering of large prompts run in a worker thread
   (`off_loop`), so one big prompt does not stall every other request's stream.

Unsupported fields (`UNSUPPORTED`) are refused with a 400 naming the field only when their
value asks for something (`tools: []`, `response_format: {"type": "text"}`,
`logit_bias: {}` are accepted): an OpenAI client that sends its defaults keeps working,
one that relies on the feature learns it is missing instead of getting silently
different output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from pdserve.errors import InvalidRequestError
from pdserve.router.gateway.config import GatewayConfig
from pdserve.router.gateway.errors import PayloadTooLargeError

T = TypeVar("T")

INLINE_TOKENIZE_BYTES = 8192  # smaller prompts are tokenised on the loop (a thread hop costs more)
DEFAULT_TOKEN_BYTES = 64  # bytes per token when the vocabulary cannot be read

# field -> predicate: is this value harmless (the feature not actually asked for)?
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "logit_bias": lambda v: v is None or v == {},
    "repetition_penalty": lambda v: v is None or v == 1,
    "suffix": lambda v: v is None or v == "",
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prompt_logprobs": lambda v: v is None,
    "truncate_prompt_tokens": lambda v: v is None,
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, or `PayloadTooLargeError` as soon as it is known to exceed `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(too_large_message(int(declared), max_bytes))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(too_large_message(size, max_bytes, at_least=True))
        chunks.append(chunk)
    return b"".join(chunks)


def too_large_message(size: int, max_bytes: int, at_least: bool = False) -> str:
    more = "at least " if at_least else ""
    return f"the request body is {more}{size} bytes; the limit is {max_bytes} bytes"


def check_unsupported(extra: dict[str, Any] | None) -> None:
    """400 naming the first unknown field that asks for an unsupported feature."""
    for name, value in (extra or {}).items():
        is_harmless = UNSUPPORTED.get(name)
        if is_harmless is not None and not _safe(is_harmless, value):
            raise InvalidRequestError(f"{name} is not supported by this server", name)


def _safe(predicate: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(predicate(value))
    except Exception:  # an odd value (unhashable, ...) asks for something
        return False


def check_limits(body: Any, config: GatewayConfig, max_prompt_bytes: int) -> None:
    """Raise `InvalidRequestError` naming the parameter over a limit. `body` is a parsed
    `CompletionRequest` or `ChatCompletionRequest`."""
    n = body.n if body.n is not None else 1
    _at_most(n, config.max_n, "n", "samples")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    _at_most(len(stop), config.max_stop, "stop", "stop strings")
    for s in stop:
        _at_most(len(s), config.max_stop_chars, "stop", "characters in one stop string")
    _at_most(len(body.stop_token_ids or ()), config.max_stop_token_ids, "stop_token_ids", "ids")
    if hasattr(body, "prompts"):
        prompts = body.prompts
        _at_most(len(prompts), config.max_prompts, "prompt", "prompts in one request")
        for prompt in prompts:
            size = len(prompt.encode()) if isinstance(prompt, str) else 0
            _prompt_fits(size, max_prompt_bytes, "prompt")
    else:
        size = sum(len(m.text.encode()) for m in body.messages)
        _prompt_fits(size, max_prompt_bytes, "messages")


def _at_most(value: int, limit: int, param: str, what: str) -> None:
    if value > limit:
        raise InvalidRequestError(f"{param}: at most {limit} {what} allowed, got {value}", param)


def _prompt_fits(size: int, max_bytes: int, param: str) -> None:
    if size > max_bytes:
        raise InvalidRequestError(
            f"the prompt is {size} bytes, more than any prompt that fits this model's "
            f"context can be ({max_bytes} bytes)",
            param,
        )


def max_prompt_bytes(config: GatewayConfig, token_bytes: int, max_model_len: int) -> int:
    """`config.max_prompt_bytes`, or the context length times the longest token's bytes
    (`token_bytes`: an upper bound on the text any in-context prompt can have)."""
    if config.max_prompt_bytes is not None:
        return config.max_prompt_bytes
    return max_model_len * token_bytes


def queued_tokens_floor(body: bytes, token_bytes: int) -> tuple[int, int] | None:
    """(a lower bound on the prompt tokens x n the request will queue, its priority) from
    a raw JSON body, or None when the body does not say (not JSON, unexpected types: the
    route then parses it and answers). Token-id prompts count exactly; text counts its
    UTF-8 bytes over `token_bytes`, the longest token's (no tokenisation); chat counts
    the text of its messages (the template only adds). Used by the HTTP edge to refuse a
    request that would miss admission even at this size, before parsing it properly."""
    try:
        data = json.loads(body)
        priority, n = data.get("priority", 0), data.get("n", 1)
    except (ValueError, AttributeError):
        return None
    if type(priority) is not int or type(n) is not int or n < 1:
        return None
    if "messages" in data:
        texts = _message_texts(data["messages"])
        return None if texts is None else (max(1, sum(texts) // token_bytes) * n, priority)
    count = _prompt_tokens_floor(data.get("prompt"), token_bytes)
    return None if count is None else (count * n, priority)


def _prompt_tokens_floor(prompt: Any, token_bytes: int) -> int | None:
    if isinstance(prompt, str):
        return max(1, len(prompt.encode()) // token_bytes)
    if isinstance(prompt, list) and prompt:
        if set(map(type, prompt)) == {int}:  # token ids (in C: no loop in Python)
            return len(prompt)
        parts = [_prompt_tokens_floor(p, token_bytes) for p in prompt]
        return None if None in parts else sum(parts)
    return None


def _message_texts(messages: Any) -> list[int] | None:
    """UTF-8 byte counts of the text in chat messages (content strings or text parts)."""
    if not isinstance(messages, list) or not messages:
        return None
    sizes = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            sizes.append(len(content.encode()))
        elif isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            sizes += [len(t.encode()) for t in texts if isinstance(t, str)]
    return sizes


def max_token_bytes(tokenizer: Any) -> int:
    """The UTF-8 length of the longest token string: at least the bytes any token stands
    for (byte-level `Ġ`, SentencePiece `▁` and `<0x41>` all spell more than they mean)."""
    try:
        lengths = (
            len((tokenizer.id_to_token(i) or "").encode()) for i in range(tokenizer.vocab_size)
        )
        return max(max(lengths, default=1), 1)
    except Exception:  # a tokenizer without a readable vocabulary
        return DEFAULT_TOKEN_BYTES


async def off_loop(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, in a worker thread when `size` bytes make it slow."""
    if size <= INLINE_TOKENIZE_BYTES:
        return fn(*args, **kwargs)
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
