"""The completion and chat handlers: request body in, generation run, response out.

Owns: the life of one HTTP request's generation — prompts tokenised and validated (all of
them, before any work starts), the client's streams run together, disconnects noticed,
unfinished requests aborted — and the choice between one JSON body and an SSE stream.

Contract with the client (`router/client.py`): each prompt becomes one `generate` call under
its own id `{request_id}-{prompt_index}`, run by `router/generation.py`; when the HTTP
request ends before a prompt's final update (client gone, another prompt failed, the
stream was closed) the generation calls `client.abort(id)` and closes the iterator,
whichever way it ended.

Errors: everything raised before the response starts propagates to `app.py`, which maps it
to a status code. A streaming response is committed only after its first update has
arrived, so a request that cannot start (503), is refused (429) or fails before its first
token (503: nothing was produced, so a retry is safe) still gets a proper status; after
that, failures become an error event followed by `data: [DONE]`.

Gateway (`router/gateway/`): prompts are tokenised off the event loop when large; then the
request's `Lease` charges its key's token quota and passes admission (429s), the SLO
planner's request log (if one runs) notes it with its hints, and the generation runs
under the lease's deadline (408) until the lease's ticket is evicted (429). Every exit
closes the lease.

Memory: the client's queue of updates holds deltas, and a consumer that falls behind
(a client not reading its stream) finds them merged, not piled up: see
`router/gateway/stream_queue.py`.

Disconnects: a non-streaming request (and a stream waiting for its first update) races the
generation against the ASGI `http.disconnect` message; a started stream is cancelled by
starlette when the client goes, and `AbortingStreamingResponse` closes the body iterator
on every exit so the aborts run at once, not whenever the generator is garbage collected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pdserve.errors import InvalidRequestError, RequestFailedError, ServiceUnavailableError
from pdserve.router.client import EngineClient
from pdserve.router.gateway import Gateway, Lease
from pdserve.router.gateway.errors import (
    DeadlineExceededError,
    PayloadTooLargeError,
    RateLimitedError,
)
from pdserve.router.gateway.limits import off_loop
from pdserve.router.generation import Generation, PromptInput, Update
from pdserve.router.metrics import RouterMetrics
from pdserve.router.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    random_id,
    sse_event,
    unix_now,
)
from pdserve.router.responses import (
    ChatChunks,
    CompletionChunks,
    ResponseMeta,
    TokenTexts,
    chat_response,
    completion_response,
)
from pdserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
STATUS_CLIENT_CLOSED = 499  # nginx's code; nobody is left to read it


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


class ApiError(Exception):
    """An error the API layer raises with its HTTP status and OpenAI body fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = error_body(message, type, param, code)


def describe_error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for an exception; the one mapping used for
    responses and for stream error events. Unexpected exceptions are logged with their
    traceback and reported without details."""
    if isinstance(exc, ApiError):
        return exc.status_code, exc.body
    if isinstance(exc, InvalidRequestError):
        return 400, error_body(str(exc), param=exc.param)
    if isinstance(exc, RateLimitedError):
        return 429, error_body(str(exc), exc.type, code=exc.code)
    if isinstance(exc, PayloadTooLargeError):
        return 413, error_body(str(exc), code="request_too_large")
    if isinstance(exc, DeadlineExceededError):
        return 408, error_body(str(exc), code="deadline_exceeded")
    if isinstance(exc, ServiceUnavailableError):
        return 503, error_body(str(exc), "server_error", code="service_unavailable")
    if isinstance(exc, RequestFailedError):
        return 500, error_body(str(exc), "server_error")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return 500, error_body("internal server error", "server_error")


def error_headers(exc: BaseException) -> dict[str, str] | None:
    """Headers that go with the error response of `exc` (Retry-After, rate limits)."""
    if isinstance(exc, RateLimitedError):
        return exc.response_headers()
    if isinstance(exc, ServiceUnavailableError):
        return {"retry-after": "1"}
    return None


class Serving:
    """The two generation endpoints over one `EngineClient`."""

    def __init__(self, client: EngineClient, metrics: RouterMetrics, gateway: Gateway) -> None:
        self.client = client
        self.metrics = metrics
        self.gateway = gateway
        self.texts = TokenTexts(client.tokenizer)

    async def completions(
        self, body: CompletionRequest, request: Request, lease: Lease
    ) -> Response:
        arrival = time.monotonic()
        lease.set_deadline(body.timeout, arrival)
        tokenizer = self.client.tokenizer
        inputs = []
        for prompt in body.prompts:
            if isinstance(prompt, str):
                token_ids = await off_loop(len(prompt), tokenizer.encode, prompt)
                inputs.append(self._prepare(prompt, token_ids, body))
            else:
                inputs.append(self._prepare(None, prompt, body))
        echo_texts = [self._prompt_text(i) for i in inputs] if body.echo else None
        meta = self._meta(random_id("cmpl"), inputs[0].params)
        _admit(lease, meta.request_id, inputs, body.priority, self.client.max_model_len)
        generation = Generation(
            self.client,
            meta.request_id,
            inputs,
            self.metrics,
            arrival,
            lease,
            body.priority,
            _observe(self.client, inputs, body),
        )
        if body.stream:
            chunks = CompletionChunks(meta, echo_texts, self.texts)
            return await stream(request, generation, chunks, _include_usage(body))
        outputs = await until_disconnect(request, generation.collect())
        return _json(completion_response(meta, outputs, echo_texts, self.texts, generation.usage))

    async def chat(self, body: ChatCompletionRequest, request: Request, lease: Lease) -> Response:
        arrival = time.monotonic()
        lease.set_deadline(body.timeout, arrival)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        size = sum(len(m["content"]) for m in messages)
        text, token_ids = await off_loop(size, self._render_chat, messages)
        prompt = self._prepare(text, token_ids, body)
        meta = self._meta(random_id("chatcmpl"), prompt.params)
        _admit(lease, meta.request_id, [prompt], body.priority, self.client.max_model_len)
        generation = Generation(
            self.client,
            meta.request_id,
            [prompt],
            self.metrics,
            arrival,
            lease,
            body.priority,
            _observe(self.client, [prompt], body),
        )
        if body.stream:
            chunks = ChatChunks(meta, self.texts)
            return await stream(request, generation, chunks, _include_usage(body))
        (output,) = await until_disconnect(request, generation.collect())
        return _json(chat_response(meta, output, self.texts, generation.usage))

    def _render_chat(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        tokenizer = self.client.tokenizer
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes BOS itself; encoding must not add a second one.
        return text, tokenizer.encode(text, add_special_tokens=False)

    def _prepare(
        self,
        text: str | None,
        token_ids: list[int],
        body: CompletionRequest | ChatCompletionRequest,
    ) -> PromptInput:
        # Like vLLM: without max_tokens a request may fill the rest of the context. A prompt
        # that leaves no room gets None, so that `validate` names the prompt, not max_tokens.
        room = self.client.max_model_len - len(token_ids)
        params = body.to_sampling_params(room if room > 0 else None)
        self.client.validate(token_ids, params)
        return PromptInput(text, list(token_ids), params)

    def _prompt_text(self, prompt: PromptInput) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.client.tokenizer.decode(prompt.token_ids)

    def _meta(self, request_id: str, params: SamplingParams) -> ResponseMeta:
        return ResponseMeta(
            request_id, self.client.model_name, unix_now(), params.n, params.logprobs
        )


def _admit(
    lease: Lease, request_id: str, inputs: list[PromptInput], priority: int, max_model_len: int
) -> None:
    """Charge the key's tokens (prompt + max_tokens, per sample), then pass admission."""
    num_queued = sum(len(p.token_ids) * p.params.n for p in inputs)
    worst_case = sum(
        len(p.token_ids) + (p.params.max_tokens or max_model_len - len(p.token_ids)) * p.params.n
        for p in inputs
    )
    lease.charge(worst_case)
    lease.admit(request_id, num_queued, priority, sum(p.params.n for p in inputs))


def _observe(
    client: EngineClient,
    inputs: list[PromptInput],
    body: CompletionRequest | ChatCompletionRequest,
) -> Callable[[float | None, float | None], None] | None:
    """What the SLO planner learns of an admitted request (control/planner.py): per sample,
    its prompt length, its output length — the client's `expected_output_tokens` hint when
    given, else its budget — and its `slo_class`; and, returned for the generation to
    call as each prompt ends, its TTFT and TPOT (control/calibration.py)."""
    log = getattr(client, "request_log", None)
    if log is None:
        return None
    for p in inputs:
        budget = p.params.max_tokens or client.max_model_len - len(p.token_ids)
        for _ in range(p.params.n):
            log.record(
                len(p.token_ids), body.expected_output_tokens or budget, slo_class=body.slo_class
            )
    admitted = time.monotonic()
    return lambda ttft_s, tpot_s: log.record_outcome(
        ttft_s, tpot_s, body.slo_class, arrival=admitted
    )


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _json(body: Any) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"))


# -- disconnects and streaming --------------------------------------------------------------


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first: then cancel it (its cleanup
    aborts the generation) and raise `ClientDisconnected`."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({work_task})
    if work_task.cancelled():
        raise ClientDisconnected
    return work_task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream(
    request: Request,
    generation: Generation,
    chunks: CompletionChunks | ChatChunks,
    include_usage: bool,
) -> Response:
    """An SSE response, started once the first update is in (see the module docstring)."""
    updates = generation.updates()
    try:
        first = await until_disconnect(request, _first(updates))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await updates.aclose()
        raise
    events = _events(first, updates, generation, chunks, include_usage)
    return AbortingStreamingResponse(events, media_type="text/event-stream")


async def _first(updates: AsyncIterator[Update]) -> Update:
    try:
        return await updates.__anext__()
    except StopAsyncIteration:
        raise RequestFailedError("the request produced no output") from None


async def _events(
    first: Update,
    updates: AsyncIterator[Update],
    generation: Generation,
    chunks: CompletionChunks | ChatChunks,
    include_usage: bool,
) -> AsyncIterator[str]:
    try:
        for event in chunks.opening():
            yield event
        for event in chunks.events(*first):
            yield event
        async for index, update in updates:
            for event in chunks.events(index, update):
                yield event
        if include_usage:
            yield chunks.usage_event(generation.usage)
    except Exception as exc:
        yield sse_event(describe_error(exc)[1])
    finally:
        with anyio.CancelScope(shield=True):
            await updates.aclose()  # type: ignore[attr-defined]
    yield SSE_DONE


class AbortingStreamingResponse(StreamingResponse):
    """A `StreamingResponse` that closes its body iterator however it ends.

    Starlette stops iterating when the client goes (cancelling the iteration, or with ASGI
    2.4 servers raising `ClientDisconnect` from `send`) but does not close the generator;
    closing it here runs its cleanup, which aborts the generation, right away.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            logger.debug("client disconnected mid-stream")
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
