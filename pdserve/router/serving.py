"""The completion and chat handlers: request body in, generation run, response out.

Owns: the life of one HTTP request's generation — prompts tokenised and validated (all of
them, before any work starts), the client's streams run together, disconnects noticed,
unfinished requests aborted — and the choice between one JSON body and an SSE stream.

Contract with the client (`router/client.py`): each prompt becomes one `generate` call under
its own id `{request_id}-{prompt_index}`; when the HTTP request ends before a prompt's final
update (client gone, another prompt failed, the stream was closed) the app calls
`client.abort(id)` and closes the iterator, whichever way it ended.

Errors: everything raised before the response starts propagates to `app.py`, which maps it
to a status code. A streaming response is committed only after its first update has
arrived, so a request that cannot start (503) or fails at once (500) still gets a proper
status; after that, failures become an error event followed by `data: [DONE]`.

Disconnects: a non-streaming request (and a stream waiting for its first update) races the
generation against the ASGI `http.disconnect` message; a started stream is cancelled by
starlette when the client goes, and `AbortingStreamingResponse` closes the body iterator
on every exit so the aborts run at once, not whenever the generator is garbage collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pdserve.errors import InvalidRequestError, RequestFailedError, ServiceUnavailableError
from pdserve.outputs import RequestOutput, StreamUpdate
from pdserve.router.client import EngineClient
from pdserve.router.metrics import RouterMetrics
from pdserve.router.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    UsageInfo,
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
Update = tuple[int, StreamUpdate]  # (prompt index, update)
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
    if isinstance(exc, ServiceUnavailableError):
        return 503, error_body(str(exc), "server_error", code="service_unavailable")
    if isinstance(exc, RequestFailedError):
        return 500, error_body(str(exc), "server_error")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return 500, error_body("internal server error", "server_error")


@dataclass(frozen=True, slots=True)
class PromptInput:
    text: str | None  # the prompt's text when it came as text (or was rendered from chat)
    token_ids: list[int]
    params: SamplingParams


class Serving:
    """The two generation endpoints over one `EngineClient`."""

    def __init__(self, client: EngineClient, metrics: RouterMetrics) -> None:
        self.client = client
        self.metrics = metrics
        self.texts = TokenTexts(client.tokenizer)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        tokenizer = self.client.tokenizer
        inputs = []
        for prompt in body.prompts:
            if isinstance(prompt, str):
                inputs.append(self._prepare(prompt, tokenizer.encode(prompt), body))
            else:
                inputs.append(self._prepare(None, prompt, body))
        echo_texts = [self._prompt_text(i) for i in inputs] if body.echo else None
        meta = self._meta(random_id("cmpl"), inputs[0].params)
        generation = Generation(self.client, meta.request_id, inputs, self.metrics, arrival)
        if body.stream:
            chunks = CompletionChunks(meta, echo_texts, self.texts)
            return await stream(request, generation, chunks, _include_usage(body))
        outputs = await until_disconnect(request, generation.collect())
        return _json(completion_response(meta, outputs, echo_texts, self.texts, generation.usage))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        tokenizer = self.client.tokenizer
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes BOS itself; encoding must not add a second one.
        prompt = self._prepare(text, tokenizer.encode(text, add_special_tokens=False), body)
        meta = self._meta(random_id("chatcmpl"), prompt.params)
        generation = Generation(self.client, meta.request_id, [prompt], self.metrics, arrival)
        if body.stream:
            chunks = ChatChunks(meta, self.texts)
            return await stream(request, generation, chunks, _include_usage(body))
        (output,) = await until_disconnect(request, generation.collect())
        return _json(chat_response(meta, output, self.texts, generation.usage))

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


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _json(body: Any) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"))


# -- one HTTP request's generation ----------------------------------------------------------


class Generation:
    """The client streams of one HTTP request's prompts, run together.

    `updates()` yields `(prompt_index, update)` as they arrive; however it ends, every
    prompt without its final update is aborted and its stream closed.
    """

    def __init__(
        self,
        client: EngineClient,
        request_id: str,
        inputs: Sequence[PromptInput],
        metrics: RouterMetrics,
        arrival: float,
    ) -> None:
        self.client = client
        self.inputs = list(inputs)
        self.request_ids = [f"{request_id}-{i}" for i in range(len(inputs))]
        self._trackers = [metrics.start_request(len(p.token_ids), arrival) for p in inputs]
        self._finished: set[int] = set()
        self._num_completion_tokens = 0
        self._num_cached_tokens = [0] * len(self.inputs)

    @property
    def usage(self) -> UsageInfo:
        num_prompt_tokens = sum(len(p.token_ids) for p in self.inputs)
        num_cached = sum(self._num_cached_tokens)
        return UsageInfo.of(num_prompt_tokens, self._num_completion_tokens, num_cached)

    async def updates(self) -> AsyncIterator[Update]:
        streams = [
            self.client.generate(request_id, p.text, p.token_ids, p.params)
            for request_id, p in zip(self.request_ids, self.inputs, strict=True)
        ]
        try:
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                async for index, update in merged:
                    self._trackers[index].observe(update)
                    self._num_completion_tokens += sum(len(d.token_ids) for d in update.deltas)
                    self._num_cached_tokens[index] = update.output.num_cached_tokens
                    if update.finished:
                        self._finished.add(index)
                    yield index, update
        finally:
            with anyio.CancelScope(shield=True):
                await self._close(streams)

    async def collect(self) -> list[RequestOutput]:
        """Run to the end; the final output of each prompt, in prompt order."""
        outputs: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(self.updates()) as updates:
            async for index, update in updates:
                outputs[index] = update.output
        if len(self._finished) < len(self.inputs):
            raise RequestFailedError("a stream ended before its request finished")
        return [outputs[i] for i in range(len(self.inputs))]

    async def _close(self, streams: list[AsyncIterator[StreamUpdate]]) -> None:
        for index, request_id in enumerate(self.request_ids):
            if index not in self._finished:
                self._trackers[index].abort(self.inputs[index].params.n)
                await self.client.abort(request_id)
        for stream_ in streams:
            aclose = getattr(stream_, "aclose", None)
            if aclose is not None:
                await aclose()


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they arrive, tagged with the iterator's index.

    One stream (the common case) is iterated directly; several are each advanced by a task
    of their own, and pending tasks are cancelled when the merge is closed.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    pending = {asyncio.ensure_future(_anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                is_item, item = task.result()
                if is_item:
                    pending[asyncio.ensure_future(_anext(streams[index]))] = index
                    yield index, item
    finally:
        for task in pending:
            task.cancel()
        if pending:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(pending)
            for task in pending:  # a failure after the merge was closed: nobody wants it
                if not task.cancelled():
                    task.exception()


async def _anext(stream_: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await stream_.__anext__()
    except StopAsyncIteration:
        return False, None


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
